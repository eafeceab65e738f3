"""The R serialization reader on streams written by hand to the R Internals format."""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from factorlm.assets.rdata import RList, load_lazy_database, unserialize
from factorlm.errors import DataError

ATTR, TAG = 1 << 9, 1 << 10


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def header(version: int = 3) -> bytes:
    out = b"X\n" + i32(version, 0x040201, 0x030500)
    return out + (i32(5) + b"UTF-8" if version == 3 else b"")


def charsxp(text: str | None) -> bytes:
    if text is None:
        return i32(0x9, -1)
    raw = text.encode()
    return i32(0x00040009, len(raw)) + raw


def strsxp(values: Sequence[str | None], attrs: bytes = b"") -> bytes:
    flags = 16 | (ATTR if attrs else 0)
    return i32(flags, len(values)) + b"".join(charsxp(v) for v in values) + attrs


def symbol(name: str) -> bytes:
    return i32(1) + charsxp(name)


def names_attr(names: list[str]) -> bytes:
    # pairlist(names = c(...)): one tagged cons cell, then NULL.
    return i32(2 | TAG) + symbol("names") + strsxp(names) + i32(254)


def vecsxp(items: list[bytes], names: list[str] | None = None) -> bytes:
    flags = 19 | (ATTR if names else 0)
    attrs = names_attr(names) if names else b""
    return i32(flags, len(items)) + b"".join(items) + attrs


def test_vectors_lists_na_and_references() -> None:
    ints = i32(13, 3, 1, -(2**31), 7)
    reals = i32(14, 2) + struct.pack(">2d", 0.5, -2.0)
    # The inner list defines the "names" symbol; the outer list's names attribute (read last)
    # refers back to it with a REFSXP to reference 1.
    inner = i32(19 | ATTR, 1) + strsxp(["x"]) + names_attr(["only"])
    outer_names = i32(2 | TAG) + i32((1 << 8) | 255) + strsxp(["text", "i", "r", "nested"])
    items = [strsxp(["Emma", None, "é"]), ints, reals, inner]
    stream = header() + i32(19 | ATTR, 4) + b"".join(items) + outer_names + i32(254)
    value = unserialize(stream)
    assert isinstance(value, RList)
    d = value.as_dict()
    assert d["text"] == ["Emma", None, "é"]
    assert d["i"] == [1, None, 7]
    assert d["r"] == [0.5, -2.0]
    assert d["nested"].attributes["names"] == ["only"]


def test_version_2_and_altrep_compact_sequence() -> None:
    info = i32(2) + symbol("compact_intseq") + i32(2) + symbol("base") + i32(2) + i32(13, 1, 13)
    info += i32(254)
    state = i32(14, 3) + struct.pack(">3d", 4.0, 10.0, 1.0)
    value = unserialize(header(2) + i32(238) + info + state + i32(254))
    assert value == [10, 11, 12, 13]


def test_bad_streams() -> None:
    with pytest.raises(DataError, match="only XDR"):
        unserialize(b"A\n" + i32(3))
    with pytest.raises(DataError, match="truncated"):
        unserialize(header() + i32(16, 5))
    with pytest.raises(DataError, match="reference 3"):
        unserialize(header() + i32((3 << 8) | 255))


def test_lazy_load_database(tmp_path: Path) -> None:
    records = [header() + strsxp(["PRIDE AND PREJUDICE", "", "It is a truth"]),
               header() + strsxp(["EMMA"])]  # fmt: skip
    blob, positions = b"", []
    for record in records:
        packed = struct.pack(">I", len(record)) + zlib.compress(record)
        positions.append((len(blob), len(packed)))
        blob += packed
    variables = vecsxp([i32(13, 2, *pos) for pos in positions], names=["pride", "emma"])
    index = header() + vecsxp(
        [variables, vecsxp([]), i32(10, 1, 1)], names=["variables", "references", "compressed"]
    )
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    novels = load_lazy_database(tmp_path / "Rdata.rdx")
    assert novels == {"pride": ["PRIDE AND PREJUDICE", "", "It is a truth"], "emma": ["EMMA"]}
    (tmp_path / "Rdata.rdb").unlink()
    with pytest.raises(DataError, match="must both exist"):
        load_lazy_database(tmp_path / "Rdata.rdx")


@pytest.mark.slow
def test_real_austen_asset() -> None:
    from factorlm.assets import austen_dir

    folder = austen_dir()
    novels = {p.stem: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")}
    assert set(novels) == {
        "emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
        "sensesensibility",
    }  # fmt: skip
    assert 3_900_000 < sum(len(t) for t in novels.values()) < 4_100_000
    assert "It is a truth universally acknowledged" in novels["prideprejudice"]
