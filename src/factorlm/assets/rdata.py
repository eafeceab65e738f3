"""A small pure-Python reader of R's serialization format, enough to read lazy-load databases.

Why: the Jane Austen novels ship only inside the Debian package ``r-cran-janeaustenr`` as an R
lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` objects), and R itself is not installed.
The format (R Internals, "Serialization formats") is a stream of XDR big-endian items, each a
flags word (type in the low byte, then object/attribute/tag bits) followed by its payload.
Versions 2 and 3 are supported; ALTREP compact sequences and wrappers are expanded.

Values map to Python as: NULL -> ``None``; character vectors -> ``list[str | None]``; logical,
integer, real vectors -> ``list``; lists -> :class:`RList` (a list with ``.attributes``);
pairlists -> ``dict`` of tag -> value.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

from factorlm.errors import DataError

__all__ = ["RList", "RVector", "load_lazy_database", "read_lazy_object", "unserialize"]

logger = logging.getLogger(__name__)

# SEXP types (R Internals, section 1.1).
_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 0, 1, 2, 3, 4, 5, 6
_SPECIALSXP, _BUILTINSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP = 7, 8, 9, 10, 13, 14
_CPLXSXP, _STRSXP, _DOTSXP, _VECSXP, _EXPRSXP, _BCODESXP = 15, 16, 17, 19, 20, 21
_EXTPTRSXP, _WEAKREFSXP, _RAWSXP, _S4SXP = 22, 23, 24, 25
# Pseudo-types used only in the serialized stream.
_REFSXP, _NILVALUE_SXP, _GLOBALENV_SXP, _UNBOUNDVALUE_SXP = 255, 254, 253, 252
_MISSINGARG_SXP, _BASENAMESPACE_SXP, _NAMESPACESXP, _PACKAGESXP = 251, 250, 249, 248
_PERSISTSXP, _EMPTYENV_SXP, _BASEENV_SXP = 247, 242, 241
_ATTRLANGSXP, _ATTRLISTSXP, _ALTREP_SXP = 240, 239, 238

_NA_INTEGER = -(2**31)


class RVector(list[Any]):
    """An atomic R vector with its attributes (names, class, ...)."""

    attributes: dict[str, Any]

    def __init__(self, values: Any = (), attributes: dict[str, Any] | None = None) -> None:
        super().__init__(values)
        self.attributes = attributes or {}


class RList(RVector):
    """A generic R vector (``list()``); ``names`` is in ``attributes`` when present."""

    def as_dict(self) -> dict[str, Any]:
        """Map names to elements; unnamed lists raise, since callers rely on the names."""
        names = self.attributes.get("names")
        if names is None:
            raise DataError("The R list has no names.")
        return dict(zip(names, self, strict=True))


class _Environment(dict[str, Any]):
    """An R environment read from the stream (kept only so references resolve)."""


class _Reader:
    """Reads one serialized R object from XDR bytes."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []
        self.source = source

    def _fail(self, what: str) -> DataError:
        return DataError(f"{self.source} is not a readable R serialization ({what}).")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self._fail("truncated stream")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def read_int(self) -> int:
        return int(struct.unpack(">i", self.take(4))[0])

    def length(self) -> int:
        n = self.read_int()
        if n == -1:
            upper, lower = self.read_int(), self.read_int()
            n = (upper << 32) + lower
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            raise self._fail(f"format {fmt!r}, only XDR 'X' is supported")
        version = self.read_int()
        self.read_int()  # writer's R version
        self.read_int()  # minimal reader R version
        if version == 3:
            self.take(self.read_int())  # native encoding name
        elif version != 2:
            raise self._fail(f"version {version}")

    def item(self) -> Any:
        flags = self.read_int()
        kind = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if kind == _NILVALUE_SXP:
            return None
        if kind in (_EMPTYENV_SXP, _BASEENV_SXP, _GLOBALENV_SXP, _BASENAMESPACE_SXP):
            return _Environment()
        if kind in (_UNBOUNDVALUE_SXP, _MISSINGARG_SXP):
            return None
        if kind == _REFSXP:
            index = flags >> 8
            if index == 0:
                index = self.read_int()
            if not 1 <= index <= len(self.refs):
                raise self._fail(f"reference {index} to an object not yet read")
            return self.refs[index - 1]
        if kind == _PERSISTSXP:
            persisted = self.string_vector()
            self.refs.append(persisted)
            return persisted
        if kind in (_PACKAGESXP, _NAMESPACESXP):
            env = _Environment(name=self.string_vector())
            self.refs.append(env)
            return env
        if kind == _SYMSXP:
            symbol = self.item()
            self.refs.append(symbol)
            return symbol
        if kind == _ENVSXP:
            env = _Environment()
            self.refs.append(env)
            self.read_int()  # locked
            self.item()  # enclosure
            frame = self.item()
            self.item()  # hash table
            self.item()  # attributes
            if isinstance(frame, dict):
                env.update(frame)
            return env
        if kind in (_LISTSXP, _LANGSXP, _CLOSXP, _PROMSXP, _DOTSXP, _ATTRLANGSXP, _ATTRLISTSXP):
            return self.pairlist(flags)
        if kind == _ALTREP_SXP:
            return self.altrep()
        if kind in (_SPECIALSXP, _BUILTINSXP):
            return self.take(self.read_int()).decode("latin-1")
        if kind == _CHARSXP:
            n = self.read_int()
            return None if n == -1 else self.take(n).decode("utf-8", errors="replace")

        value: RVector
        if kind in (_LGLSXP, _INTSXP):
            n = self.length()
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            value = RVector(None if v == _NA_INTEGER else v for v in ints)
        elif kind == _REALSXP:
            n = self.length()
            value = RVector(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind == _CPLXSXP:
            n = self.length()
            parts = struct.unpack(f">{2 * n}d", self.take(16 * n))
            value = RVector(complex(parts[i], parts[i + 1]) for i in range(0, 2 * n, 2))
        elif kind == _STRSXP:
            n = self.length()
            value = RVector(self.item() for _ in range(n))
        elif kind in (_VECSXP, _EXPRSXP):
            n = self.length()
            value = RList(self.item() for _ in range(n))
        elif kind == _RAWSXP:
            value = RVector(self.take(self.length()))
        elif kind == _S4SXP:
            value = RList()
        else:
            raise self._fail(f"unsupported SEXP type {kind}")
        if has_attr:
            attributes = self.item()
            value.attributes = attributes if isinstance(attributes, dict) else {}
        del has_tag
        return value

    def pairlist(self, flags: int) -> Any:
        """Read a pairlist iteratively (a long pairlist would exhaust Python's recursion)."""
        out: dict[str, Any] = {}
        position = 0
        while True:
            kind = flags & 0xFF
            if flags & (1 << 9):
                self.item()  # attributes of the cell
            tag = self.item() if flags & (1 << 10) else None
            out[tag if isinstance(tag, str) else str(position)] = self.item()
            position += 1
            del kind
            flags = self.read_int()
            cell = flags & 0xFF
            if cell == _NILVALUE_SXP:
                return out
            if cell not in (_LISTSXP, _LANGSXP, _ATTRLISTSXP, _ATTRLANGSXP):
                # The tail is not a cons cell: rewind and read it as an ordinary item.
                self.pos -= 4
                out[str(position)] = self.item()
                return out

    def string_vector(self) -> list[str | None]:
        if self.read_int() != 0:
            raise self._fail("a string vector flag that is not 0")
        return [self.item() for _ in range(self.read_int())]

    def altrep(self) -> Any:
        info = self.item()
        state = self.item()
        attributes = self.item()
        class_name = next(iter(info.values())) if isinstance(info, dict) and info else None
        value: RVector
        if class_name in ("compact_intseq", "compact_realseq"):
            n, start, step = (int(v) for v in state[:3])
            seq = [start + i * step for i in range(n)]
            value = RVector(seq if class_name == "compact_intseq" else [float(v) for v in seq])
        elif isinstance(class_name, str) and class_name.startswith("wrap_"):
            value = RVector(state[0])
        elif class_name == "deferred_string":
            values = state.get("0") if isinstance(state, dict) else state
            value = RVector(str(v) for v in values or ())
        else:
            raise self._fail(f"unsupported ALTREP class {class_name!r}")
        if isinstance(attributes, dict):
            value.attributes = attributes
        return value


def unserialize(data: bytes, *, source: str = "R data") -> Any:
    """Decode one R serialization stream (XDR, version 2 or 3)."""
    reader = _Reader(data, source)
    reader.header()
    return reader.item()


def _decompress_record(blob: bytes, compressed: int, source: str) -> bytes:
    """Undo the compression R's lazy-load writer applied to one record."""
    if blob[:2] == b"\x1f\x8b":  # an index written as a gzip file
        return gzip.decompress(blob)
    expected = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    method = {1: "Z", 2: "2", 3: "X"}.get(compressed, "Z")
    if compressed in (2, 3):
        method, body = chr(body[0]), body[1:]
    if method == "Z":
        out = zlib.decompress(body)
    elif method == "2":
        out = bz2.decompress(body)
    elif method == "X":
        out = lzma.decompress(body)
    elif method == "0":
        out = body
    else:
        raise DataError(f"{source} uses an unknown compression method {method!r}.")
    if len(out) != expected:
        raise DataError(f"{source} is truncated ({len(out)} of {expected} bytes).")
    return out


def load_lazy_database(rdx: Path) -> dict[str, Any]:
    """Read every variable of an R lazy-load database (``X.rdx`` + ``X.rdb``) by name."""
    rdb = rdx.with_suffix(".rdb")
    if not rdx.is_file() or not rdb.is_file():
        raise DataError(f"{rdx} and {rdb} must both exist to read an R lazy-load database.")
    raw = rdx.read_bytes()
    index = unserialize(_decompress_record(raw, 1, str(rdx)), source=str(rdx))
    if not isinstance(index, RList):
        raise DataError(f"{rdx} is not an R lazy-load index.")
    entries = index.as_dict()
    compressed = entries.get("compressed") or [1]
    mode = int(compressed[0]) if compressed[0] is not None else 1
    variables = entries["variables"]
    names = variables.attributes.get("names", [])
    data = rdb.read_bytes()
    return {
        name: read_lazy_object(data, [int(x) for x in pos], mode, str(rdb))
        for name, pos in zip(names, variables, strict=True)
    }


def read_lazy_object(rdb: bytes, position: list[int], compressed: int, source: str) -> Any:
    """Decode the object at ``(offset, length)`` of a lazy-load database's bytes."""
    offset, size = position
    blob = rdb[offset : offset + size]
    return unserialize(_decompress_record(blob, compressed, source), source=source)
