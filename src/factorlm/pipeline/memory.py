"""Per-stage resident memory of ``factorlm run``, and giving memory back between stages.

Why: ``getrusage``'s ``ru_maxrss`` is the whole process's high-water mark, so after the first
heavy stage it says nothing about the later ones. :class:`StagePeak` resets the kernel's
high-water mark (``VmHWM``, through ``/proc/self/clear_refs``) when a stage starts and reads it
when the stage ends, which is the stage's exact peak, and a thread also samples ``VmRSS`` every
50 ms (a stage that resets the mark itself, like the benchmark's memory probe, would otherwise
hide its earlier peak); the larger of the two is recorded (``method`` says which were used).
:func:`release_memory` runs the garbage collector and asks glibc to return freed heap pages to
the system, so a stage's RSS after it ends is what it still holds, not allocator slack.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import resource
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["StagePeak", "process_peak_mib", "release_memory", "rss_mib"]

logger = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        with _STATUS.open(encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    """This process's resident memory now, in MiB (None without ``/proc``)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def _maxrss_mib() -> float:
    """This program's high-water mark in MiB: ``VmHWM`` where there is ``/proc`` (after fork +
    exec, ``ru_maxrss`` still counts the parent's memory at the fork), else ``ru_maxrss``."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / 2**20 if sys.platform == "darwin" else value / 1024


#: The largest peak seen by any StagePeak or ru_maxrss read here: resetting VmHWM also lowers
#: what ``getrusage`` reports afterwards, so the process's true peak is kept here.
_PROCESS_PEAK = [0.0]


def process_peak_mib() -> float:
    """This process's peak RSS in MiB, including peaks measured before any VmHWM reset."""
    _PROCESS_PEAK[0] = max(_PROCESS_PEAK[0], _maxrss_mib())
    return _PROCESS_PEAK[0]


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc ``malloc_trim``)."""
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)


class StagePeak:
    """Context manager measuring one stage's peak resident memory (see the module docstring)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.start_mib: float | None = None
        self.peak_mib: float | None = None
        self.end_mib: float | None = None
        self.method = "none"
        self._maxrss_before = 0.0
        self._maxrss_after = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0.0

    def _reset_hwm(self) -> bool:
        process_peak_mib()  # keep the peak so far: the reset also lowers ru_maxrss
        try:
            _CLEAR_REFS.write_text("5", encoding="ascii")
        except OSError:
            return False
        return True

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = rss_mib()
            if now is not None:
                self._sampled = max(self._sampled, now)

    def __enter__(self) -> StagePeak:
        self.start_mib = rss_mib()
        self._maxrss_before = process_peak_mib()
        self._sampled = self.start_mib or 0.0
        if self.start_mib is None:
            return self
        sampled = f"VmRSS sampled every {int(self.interval_s * 1000)} ms"
        self.method = f"VmHWM reset at stage start + {sampled}" if self._reset_hwm() else sampled
        self._thread = threading.Thread(target=self._sample, name="factorlm-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self.start_mib is not None:
            hwm = _status_kib("VmHWM") if self.method.startswith("VmHWM") else None
            self.peak_mib = max(self._sampled, rss_mib() or 0.0, (hwm or 0) / 1024)
            _PROCESS_PEAK[0] = max(_PROCESS_PEAK[0], self.peak_mib)
        self._maxrss_after = process_peak_mib()
        release_memory()
        self.end_mib = rss_mib()

    def record(self) -> dict[str, Any]:
        """The manifest entry: MiB at start, peak during, after release, and the process's
        peak so far (``process_peak_mib``)."""

        def mib(value: float | None) -> float | None:
            return None if value is None else round(value, 1)

        return {
            "start_rss_mib": mib(self.start_mib),
            "peak_rss_mib": mib(self.peak_mib),
            "end_rss_mib": mib(self.end_mib),
            "process_peak_rss_mib": mib(max(self._maxrss_before, self._maxrss_after)),
            "method": self.method,
        }
