"""One checked way to read a file a user hands us: text, JSON, YAML, JSONL lines or CSV rows.

Why: data, plan, config and engine-manifest files come from elsewhere (CI jobs, colleagues,
downloads). Every reader goes through here so a bad file fails the same way everywhere, with one
sentence naming the file: a size over the limit, bytes that are not UTF-8 (with the byte offset),
JSON or YAML nested deeper than any real file, a CSV field over the field limit, or a record whose
fields have the wrong types. Nothing here evaluates anything: JSON via ``json``, YAML via
``yaml.safe_load`` only.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from factorlm.errors import ConfigError, FactorlmError

__all__ = [
    "CSV_FIELD_LIMIT",
    "MAX_DATA_DOCUMENT_BYTES",
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "MAX_LINE_BYTES",
    "check_fields",
    "check_onnx_model",
    "check_torch_file",
    "iter_csv_rows",
    "iter_lines",
    "parse_json",
    "read_json",
    "read_text",
    "read_yaml",
]

logger = logging.getLogger(__name__)

#: A plan, config or manifest larger than this is not one (a 70B model's plan is ~1 MiB).
MAX_DOCUMENT_BYTES = 64 * 2**20
#: One line of a JSONL/TXT data file, and a whole JSON-array data file, may be this large.
MAX_LINE_BYTES = 64 * 2**20
MAX_DATA_DOCUMENT_BYTES = 1024 * 2**20
#: Deeper JSON/YAML than this is hostile, not a plan or a record.
MAX_DEPTH = 64
#: Values a YAML document may expand to through aliases (a config has a few hundred).
MAX_YAML_VALUES = 1_000_000
#: CSV fields may hold a long document (the stdlib's default limit is 128 KiB).
CSV_FIELD_LIMIT = 16 * 2**20

ErrorType = type[FactorlmError]


def _size_checked(path: Path, what: str, limit: int, error: ErrorType) -> int:
    if not path.exists():
        raise error(f"{what} {path} does not exist.")
    if not path.is_file():
        raise error(f"{what} {path} is not a file.")
    size = path.stat().st_size
    if size > limit:
        raise error(
            f"{what} {path} is {size / 2**20:.0f} MiB, over the {limit // 2**20} MiB limit for "
            "such a file."
        )
    return size


def _decode(raw: bytes, path: Path, what: str, error: ErrorType, base: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{what} {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte offset "
            f"{base + exc.start}); save it as UTF-8."
        ) from None


def read_text(
    path: str | Path,
    *,
    what: str = "file",
    limit: int = MAX_DOCUMENT_BYTES,
    error: ErrorType = ConfigError,
) -> str:
    """The UTF-8 text of ``path`` (a leading BOM dropped), or ``error`` in one sentence."""
    path = Path(path)
    _size_checked(path, what, limit, error)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc}).") from None
    if raw.startswith(codecs.BOM_UTF8):
        return _decode(raw[3:], path, what, error, base=3)
    return _decode(raw, path, what, error)


def _containers(value: Any) -> list[Any] | None:
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, list | tuple):
        return list(value)
    return None


def _shape(value: Any) -> tuple[int, int]:
    """Nesting depth and expanded node count of lists/dicts, each shared node measured once.

    Iterative (a hostile value cannot blow the stack) and memoized by identity, so YAML aliases
    that share one node many times (billion laughs) cost their distinct nodes, not their expansion;
    a node that contains itself (a recursive YAML alias) raises ``RecursionError``.
    """
    if _containers(value) is None:
        return 0, 1
    memo: dict[int, tuple[int, int]] = {}
    entered: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, finished = stack.pop()
        children = _containers(item)
        if children is None:
            continue
        key = id(item)
        if finished:
            depth, nodes = 1, 1
            for child in children:
                child_depth, child_nodes = memo.get(id(child), (0, 1))
                depth = max(depth, child_depth + 1)
                nodes += child_nodes
            memo[key] = (depth, nodes)
            continue
        if key in memo:
            continue
        if key in entered:  # entered but not finished: an ancestor of itself
            raise RecursionError("a list or mapping contains itself")
        entered.add(key)
        stack.append((item, True))
        stack.extend((child, False) for child in children if id(child) not in memo)
    return memo[id(value)]


def _check_depth(
    value: Any, source: str, error: ErrorType, max_depth: int, max_nodes: int | None = None
) -> Any:
    try:
        depth, nodes = _shape(value)
    except RecursionError:
        raise error(
            f"{source} holds a list or mapping that contains itself; refusing it."
        ) from None
    if depth > max_depth:
        raise error(
            f"{source} nests lists/objects deeper than {max_depth} levels; refusing it."
        ) from None
    if max_nodes is not None and nodes > max_nodes:
        raise error(
            f"{source} expands to more than {max_nodes:,} values through YAML aliases; refusing it."
        ) from None
    return value


def parse_json(
    text: str, *, source: str, error: ErrorType = ConfigError, max_depth: int = MAX_DEPTH
) -> Any:
    """``json.loads`` with one-sentence errors and a nesting limit (``source`` names the file)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})."
        ) from None
    except RecursionError:
        raise error(
            f"{source} nests lists/objects deeper than {max_depth} levels; refusing it."
        ) from None
    return _check_depth(value, source, error, max_depth)


def read_json(
    path: str | Path,
    *,
    what: str = "file",
    limit: int = MAX_DOCUMENT_BYTES,
    error: ErrorType = ConfigError,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parse the JSON file ``path`` (size, encoding and depth checked)."""
    text = read_text(path, what=what, limit=limit, error=error)
    return parse_json(text, source=f"{what} {path}", error=error, max_depth=max_depth)


def read_yaml(
    path: str | Path,
    *,
    what: str = "file",
    limit: int = MAX_DOCUMENT_BYTES,
    error: ErrorType = ConfigError,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """``yaml.safe_load`` of ``path`` (no tags, no code), size/encoding/depth checked."""
    import yaml

    text = read_text(path, what=what, limit=limit, error=error)
    source = f"{what} {path}"
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise error(f"{source} is not valid YAML ({problem}{where}).") from None
    except RecursionError:
        raise error(
            f"{source} nests lists/mappings deeper than {max_depth} levels; refusing it."
        ) from None
    return _check_depth(value, source, error, max_depth, MAX_YAML_VALUES)


def _open_binary(path: Path, what: str, error: ErrorType) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc}).") from None


def iter_lines(
    path: str | Path,
    *,
    what: str = "data file",
    limit: int = MAX_LINE_BYTES,
    error: ErrorType = ConfigError,
) -> Iterator[tuple[int, str]]:
    """Stream ``(line number, text)`` of a UTF-8 file, checking each line's bytes and length.

    A decode error names the byte offset in the file; a line over ``limit`` bytes is refused
    (the file may be any size: only one line is in memory at a time).
    """
    path = Path(path)
    _size_checked(path, what, 2**62, error)
    with _open_binary(path, what, error) as handle:
        offset = 0
        number = 0
        while True:
            raw = handle.readline(limit + 1)
            if not raw:
                return
            number += 1
            if len(raw) > limit:
                raise error(
                    f"{what} {path} line {number} is longer than {limit // 2**20} MiB; refusing it."
                )
            start = 0
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                start = 3
            yield number, _decode(raw[start:], path, what, error, base=offset + start)
            offset += len(raw)


class _LineFeed:
    """Text lines of a file for ``csv.reader``, remembering the current line number."""

    def __init__(self, lines: Iterator[tuple[int, str]]) -> None:
        self.lines = lines
        self.number = 0

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        self.number, text = next(self.lines)
        return text


def _raise_csv_limit() -> None:
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)


def iter_csv_rows(
    path: str | Path,
    *,
    delimiter: str = ",",
    what: str = "data file",
    error: ErrorType = ConfigError,
) -> Iterator[dict[str, Any]]:
    """Records of a CSV/TSV file by header name; fields up to ``CSV_FIELD_LIMIT`` bytes."""
    path = Path(path)
    _raise_csv_limit()
    feed = _LineFeed(iter_lines(path, what=what, error=error))
    reader = csv.DictReader(feed, delimiter=delimiter)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise error(
                f"{what} {path} line {feed.number} is not valid CSV ({exc}; fields may hold at "
                f"most {CSV_FIELD_LIMIT // 2**20} MiB)."
            ) from None
        yield row


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a (simple) type hint: str, int, float, bool, list[...], dict,
    Any, None and unions of these."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is list:
        args = typing.get_args(hint)
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def check_fields(
    record: Mapping[str, Any], cls: type, *, where: str, error: ErrorType = ConfigError
) -> None:
    """Refuse a record whose fields do not have the types of dataclass ``cls``'s annotations.

    ``where`` names the record ("plan p.json: entry 'w'"); the sentence names the field, the
    expected type and what was found.
    """
    hints = typing.get_type_hints(cls)
    for key, value in record.items():
        hint = hints.get(key)
        if hint is not None and not _matches(value, hint):
            plain = typing.get_origin(hint) is None and isinstance(hint, type)
            expected = hint.__name__ if plain else str(hint).replace("typing.", "")
            raise error(
                f"{where}: field {key!r} must be {expected}, not {type(value).__name__} "
                f"{json.dumps(value)[:40] if _jsonable(value) else ''}".rstrip()
                + "."
            )


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def check_onnx_model(proto: Any, path: str | Path, *, error: ErrorType | None = None) -> None:
    """Refuse an ONNX model (parsed without its external data) that would fail only later.

    Checked: an opset newer than the installed ``onnx`` knows, the ONNX checker's structural
    rules (unique initializer names, topological order, known inputs, raw data at least as long
    as the dims need), and external data whose ``length`` does not match its tensor's
    dims and type. One sentence naming the file (and the tensor) on failure.
    """
    import numpy as np
    import onnx
    from onnx import external_data_helper, helper

    from factorlm.errors import ModelLoadError

    error = error or ModelLoadError
    path = Path(path)
    newest = onnx.defs.onnx_opset_version()
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version > newest:
            raise error(
                f"{path} uses opset {entry.version}, newer than the installed onnx supports "
                f"({newest}); export it with --opset {newest} or lower."
            )
    names = [t.name for t in proto.graph.initializer]
    if len(names) != len(set(names)):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
        raise error(f"{path} holds two initializers named {dup!r}; an ONNX name must be unique.")
    for tensor in proto.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        if tensor.data_type == onnx.TensorProto.STRING:
            continue
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
        info = external_data_helper.ExternalDataInfo(tensor)
        if info.length is not None and int(info.length) != expected:
            raise error(
                f"{path}: external data of tensor {tensor.name!r} is {int(info.length)} bytes "
                f"long, but its shape {list(tensor.dims)} needs {expected} bytes."
            )
        target = path.parent / str(info.location)
        if target.is_file() and int(info.offset or 0) + expected > target.stat().st_size:
            raise error(
                f"{path}: external data file {info.location!r} is too short for tensor "
                f"{tensor.name!r} ({expected} bytes at offset {int(info.offset or 0)})."
            )
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid graph"
        raise error(f"{path} is not a valid ONNX model: {first.rstrip('.:')}.") from None


def check_torch_file(path: str | Path, *, error: ErrorType | None = None) -> None:
    """Refuse a pickled PyTorch file holding anything but tensors and plain values.

    Loaded with ``weights_only=True`` (memory-mapped when the file allows it), so a planted
    ``pytorch_model.bin`` cannot run code; refused in one sentence before any expensive work.
    """
    import pickle
    import warnings

    import torch

    from factorlm.errors import ModelLoadError

    error = error or ModelLoadError
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.load(path, weights_only=True, map_location="cpu", mmap=True)
            except RuntimeError:  # not a zip archive: the legacy format cannot be mapped
                torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise error(
            f"{path} holds objects other than tensors and plain values (a pickle that could run "
            "code), so it was not loaded; use .safetensors weights or a file you trust."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise error(f"{path} is not a readable PyTorch file ({type(exc).__name__}).") from None
