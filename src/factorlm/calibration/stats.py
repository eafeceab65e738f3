"""The calibration statistics container and its ``.npz`` format.

Why a format of our own inside ``.npz``: ONNX initializer names contain ``/``, ``:`` and dots,
which make poor zip member names, so arrays are stored under positional keys with a JSON index
of ``(kind, initializer name)`` pairs. No pickle is involved, so loading a file is safe.
"""

from __future__ import annotations

import copy
import json
import logging
import mmap
import os
import struct
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from factorlm.errors import DataError

__all__ = [
    "CalibrationStats",
    "drop_mapped_pages",
    "load_arrays",
    "paged_statistics",
    "release_pages",
    "save_arrays",
]

logger = logging.getLogger(__name__)

_KINDS = (
    "gram", "mean_abs", "fisher", "output_fisher", "gram_heldout", "output_gram", "token_counts",
    "gram_generic", "output_fisher_generic",
)  # fmt: skip
_FORMAT = "factorlm-calibration-1"


def save_arrays(
    path: Path, groups: dict[str, dict[str, np.ndarray]], meta: dict[str, object]
) -> None:
    """Write named array groups plus JSON metadata to ``path`` atomically (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    index: list[list[str]] = []
    arrays: dict[str, np.ndarray] = {}
    for kind, named in groups.items():
        for name, array in named.items():
            arrays[f"a{len(index)}"] = np.asarray(array)
            index.append([kind, name])
    header = json.dumps({"format": _FORMAT, "index": index, "meta": meta})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        arrays["__header__"] = np.array(header)
        with open(tmp, "wb") as handle:
            _write_npz(handle, arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_npz(handle: Any, arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` writes (uncompressed members), one array at a time.

    Why not ``np.savez``: after each memory-mapped array (spilled or loaded with ``mmap=True``)
    is written, its pages are handed back, so saving statistics larger than memory does not
    make them all resident.
    """
    with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
            release_pages([array])


def _mapped_members(path: Path) -> dict[str, np.ndarray]:
    """Read-only views, in one shared memory map of ``path``, of its uncompressed .npy members.

    Why: a BERT-base statistics file is 1.2 GB of Grams, each needed for one weight at a time;
    mapped, a Gram is read when used and :func:`drop_mapped_pages` hands its pages back.
    Members that cannot be mapped (compressed, object arrays) are left to ``np.load``.
    """
    views: dict[str, np.ndarray] = {}
    with path.open("rb") as handle, zipfile.ZipFile(handle) as archive:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                continue
            handle.seek(info.header_offset)
            local = handle.read(30)  # the local file header: its name and extra lengths
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            handle.seek(info.header_offset + 30 + name_len + extra_len)
            start = handle.tell()
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                continue
            if dtype.hasobject:
                continue
            count = int(np.prod(shape, dtype=np.int64))
            if handle.tell() + count * dtype.itemsize > start + info.file_size:
                continue
            flat = np.frombuffer(mapped, dtype=dtype, count=count, offset=handle.tell())
            views[info.filename[: -len(".npy")]] = flat.reshape(
                shape, order="F" if fortran else "C"
            )
    return views


def _maps_of(arrays: Iterable[np.ndarray]) -> list[mmap.mmap]:
    maps: dict[int, mmap.mmap] = {}
    for array in arrays:
        base: object = array
        while isinstance(base, np.ndarray):
            base = base.base
        if isinstance(base, memoryview):
            base = base.obj
        if isinstance(base, mmap.mmap):
            maps[id(base)] = base
    return list(maps.values())


def release_pages(arrays: Iterable[np.ndarray]) -> int:
    """Hand back the resident pages of the memory maps behind ``arrays``; how many maps.

    The arrays stay valid (read-only views of their files): a later read maps the pages in
    again from the page cache. Arrays not backed by a memory map are untouched.
    """
    maps = _maps_of(arrays)
    for mapped in maps:
        mapped.madvise(mmap.MADV_DONTNEED)
    return len(maps)


def drop_mapped_pages(stats: object) -> int:
    """Hand back the resident pages of every memory map behind ``stats``' arrays.

    The arrays stay valid (the maps are read-only views of the file): a later read maps the
    pages in again from the page cache. Returns how many maps were released; arrays not loaded
    with ``mmap=True`` are untouched.
    """
    tables = [getattr(stats, kind, None) or {} for kind in _KINDS]
    return release_pages(array for table in tables for array in table.values())


class _PagedTable(dict[str, np.ndarray]):
    """A statistics table whose every lookup first releases the pages earlier lookups read."""

    def __init__(self, table: Mapping[str, np.ndarray]) -> None:
        super().__init__(table)
        self.maps = _maps_of(table.values())

    def __getitem__(self, key: str) -> np.ndarray:
        for mapped in self.maps:
            mapped.madvise(mmap.MADV_DONTNEED)
        return super().__getitem__(key)


def paged_statistics(stats: Any) -> Any:
    """A shallow copy of memory-mapped ``stats`` that keeps about one array resident at a time.

    Why: planning reads every weight's Gram once; mapped pages stay resident once read, so
    without this the whole file ends up in memory during planning. Each table lookup releases
    the pages read before (a still-used array simply reads them again). ``stats`` without
    memory-mapped arrays is returned as it is.
    """
    if stats is None or not drop_mapped_pages(stats):
        return stats
    result = copy.copy(stats)
    for kind in _KINDS:
        table = getattr(stats, kind, None)
        if table:
            setattr(result, kind, _PagedTable(table))
    return result


def load_arrays(
    path: Path, *, mmap_arrays: bool = False
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, object]]:
    """Read what :func:`save_arrays` wrote: ``(groups, meta)``.

    ``mmap_arrays``: arrays are read-only views of a memory map of the file (read on use).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The statistics file {path} does not exist.")
    try:
        mapped = _mapped_members(path) if mmap_arrays else {}
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(str(npz["__header__"]))
            if header.get("format") != _FORMAT:
                raise DataError(f"{path} is not a factorlm statistics file.")
            groups: dict[str, dict[str, np.ndarray]] = {}
            for i, (kind, name) in enumerate(header["index"]):
                key = f"a{i}"
                groups.setdefault(kind, {})[name] = mapped[key] if key in mapped else npz[key]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable factorlm statistics file ({exc}).") from exc
    return groups, dict(header.get("meta", {}))


def _count(value: object) -> int:
    return int(value) if isinstance(value, int | float | str) else 0


@dataclass
class CalibrationStats:
    """Statistics of each target weight's input activation, keyed by ONNX initializer name.

    Attributes:
        gram: ``X^T X`` (in, in) float64, summed over every non-padding token.
        mean_abs: mean ``|x|`` per input feature (in,) float64.
        fisher: Fisher row sums per output feature (out,) float64 (FWSVD), when collected.
        output_fisher: ``Σ (∂L/∂y_j)²`` per output feature (out,) float64 (loss-aware whitening).
        output_gram: the full ``Σ_t g_t g_tᵀ`` (out, out) float64 of the output gradients ``g_t``
            (loss-aware whitening; used instead of ``output_fisher`` where present).
        gram_heldout: the part of ``gram`` from held-back batches (``heldout_tokens`` tokens),
            for choosing the shrinkage by held-back likelihood; empty unless asked for.
        tokens: number of non-padding tokens that went into the statistics.
        token_counts: for an embedding tied to an LM head (a target also read by
            ``Gather(E, input_ids)``), how often each token id was looked up (vocab,) float64:
            the rows a factorization of the shared matrix must keep (``planning.lookup_weight``).
        gram_generic: the same Grams on generic text (factorlm's mixed-genre set,
            ``generic_tokens`` tokens), for ``compress --blend``; empty unless asked for.
        output_fisher_generic: the output Fisher on the same generic text, which ``--blend``
            mixes into ``output_fisher`` under ``--loss-aware``; empty unless asked for.
    """

    gram: dict[str, np.ndarray] = field(default_factory=dict)
    mean_abs: dict[str, np.ndarray] = field(default_factory=dict)
    fisher: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: int = 0
    output_fisher: dict[str, np.ndarray] = field(default_factory=dict)
    gram_heldout: dict[str, np.ndarray] = field(default_factory=dict)
    heldout_tokens: int = 0
    output_gram: dict[str, np.ndarray] = field(default_factory=dict)
    token_counts: dict[str, np.ndarray] = field(default_factory=dict)
    gram_generic: dict[str, np.ndarray] = field(default_factory=dict)
    generic_tokens: int = 0
    output_fisher_generic: dict[str, np.ndarray] = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        """Write the statistics to ``path`` (.npz), atomically; return the path."""
        groups = {kind: getattr(self, kind) for kind in _KINDS}
        meta: dict[str, object] = {
            "tokens": int(self.tokens),
            "heldout_tokens": int(self.heldout_tokens),
            "generic_tokens": int(self.generic_tokens),
        }
        save_arrays(Path(path), groups, meta)
        return Path(path)

    @classmethod
    def load(cls, path: Path, *, mmap: bool = False) -> CalibrationStats:
        """Read statistics written by :meth:`save`.

        ``mmap``: the arrays are read-only views of a memory map of the file, read when used
        (:func:`drop_mapped_pages` releases them again): a large file costs no memory up front.
        """
        groups, meta = load_arrays(Path(path), mmap_arrays=mmap)
        tokens = meta.get("tokens", 0)
        return cls(
            gram=groups.get("gram", {}),
            mean_abs=groups.get("mean_abs", {}),
            fisher=groups.get("fisher", {}),
            output_fisher=groups.get("output_fisher", {}),
            gram_heldout=groups.get("gram_heldout", {}),
            output_gram=groups.get("output_gram", {}),
            token_counts=groups.get("token_counts", {}),
            gram_generic=groups.get("gram_generic", {}),
            output_fisher_generic=groups.get("output_fisher_generic", {}),
            generic_tokens=_count(meta.get("generic_tokens", 0)),
            heldout_tokens=_count(meta.get("heldout_tokens", 0)),
            tokens=int(tokens) if isinstance(tokens, int | float | str) else 0,
        )
