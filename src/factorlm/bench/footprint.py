"""What an engine costs besides time: its bytes on disk and the memory of its session.

- ``engine_size``: the engine file plus every external-data file an ONNX file refers to.
- ``MemoryProbe``: resident memory of this process around opening a session and running one
  probe inference (the largest point of the latency grid). On Linux the kernel's high-water mark
  ``VmHWM`` is reset first (``/proc/self/clear_refs``), so ``peak_bytes`` is the peak resident
  memory during session creation and the probe, above the resident memory before it;
  ``resident_bytes`` is what stays resident after the probe. The probe's numpy feeds and returned
  outputs (held by Python, not by the session) are subtracted; what remains is the session's
  weights, its allocator arenas and the probe's intermediate tensors. Freed heap pages are handed
back to the OS first (glibc ``malloc_trim``), so sessions opened one after another in the same
process are measured alike; the figures are still process deltas (a library loaded by the first
session is counted once, in the first). Where the high-water mark
  cannot be reset (not Linux, no permission) ``peak_bytes`` is null. Host memory only: a
  TensorRT engine's GPU memory is not counted.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from factorlm._common.outputs import external_data_files

__all__ = ["MEMORY_METHOD", "MemoryProbe", "engine_size"]

logger = logging.getLogger(__name__)

MEMORY_METHOD = (
    "VmHWM/VmRSS of this process (/proc/self/status; high-water mark reset through "
    "/proc/self/clear_refs) around session creation and one inference at the largest grid "
    "point, less the probe's numpy feeds and outputs"
)
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def engine_size(path: Path) -> dict[str, Any]:
    """Bytes on disk of an engine file and its external data, and how many files that is."""
    path = Path(path)
    files = [path] + [f for f in external_data_files(path) if f.resolve() != path.resolve()]
    if path.suffix != ".onnx":
        files = [path]
    unique = {f.resolve(): f for f in files if f.is_file()}
    return {
        "size_bytes": int(sum(f.stat().st_size for f in unique.values())),
        "files": len(unique),
    }


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text(encoding="ascii").splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so a session opened after another one does
    not fill pages the earlier one freed without raising the resident size."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def _held_bytes(arrays: Iterable[Mapping[str, np.ndarray]]) -> int:
    return int(sum(np.asarray(a).nbytes for group in arrays for a in group.values()))


@dataclass
class MemoryProbe:
    """Resident memory before; ``finish`` turns the state after into the report's numbers."""

    before_kib: int | None
    peak_reset: bool

    @classmethod
    def start(cls) -> MemoryProbe:
        gc.collect()
        _trim_heap()
        before = _status_kib("VmRSS")
        return cls(before, _reset_peak() if before is not None else False)

    def finish(self, held: Iterable[Mapping[str, np.ndarray]] = ()) -> dict[str, Any]:
        """``held``: the probe's feeds and outputs, subtracted from both numbers."""
        extra = _held_bytes(held)
        after = _status_kib("VmRSS")
        peak = _status_kib("VmHWM") if self.peak_reset else None
        if self.before_kib is None or after is None:
            return {"resident_bytes": None, "peak_bytes": None, "method": MEMORY_METHOD}
        base = self.before_kib * 1024
        return {
            "resident_bytes": max(after * 1024 - base - extra, 0),
            "peak_bytes": max(peak * 1024 - base - extra, 0) if peak is not None else None,
            "method": MEMORY_METHOD,
        }
