"""Latency measured fairly on a noisy machine: alternation, pairing, and bootstrap intervals.

Every runner runs once per iteration on the same feeds, in a fresh random order each iteration, so
slow drifts of the machine (another job, thermal state, a neighbour's compile) and the cache state
left by the previous model hit all models alike. Iteration ``i`` of the reference and of a candidate form a pair;
the speedup is the median of the per-pair ratios ``t_ref / t_cand`` and its confidence interval
comes from a percentile bootstrap over pairs with an explicit ``numpy.random.Generator``.

A regression against a stored baseline compares *relative* latency (candidate over reference,
measured in the same run) by default, so a baseline recorded on a faster or quieter machine still
gates fairly; ``basis="absolute"`` compares the candidate's own milliseconds instead.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from factorlm.bench.runners import BaseRunner

__all__ = [
    "Interval",
    "bootstrap_median",
    "environment_info",
    "latency_summary",
    "measure_alternating",
    "regression_interval",
    "speedup_interval",
]

logger = logging.getLogger(__name__)

_LIBRARIES = (
    "factorlm",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "numpy",
    "tensorrt",
    "transformers",
)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    confidence: float

    def to_dict(self) -> dict[str, float]:
        return {
            "estimate": self.estimate,
            "ci_low": self.low,
            "ci_high": self.high,
            "confidence": self.confidence,
        }


def measure_alternating(
    runners: Sequence[BaseRunner],
    feeds: Mapping[str, np.ndarray],
    *,
    warmup: int = 5,
    iterations: int = 30,
    rng: np.random.Generator | None = None,
    on_iteration: Callable[[int], None] | None = None,
    deadline: float | None = None,
    min_iterations: int = 3,
) -> np.ndarray:
    """Seconds per inference, shape ``(rounds, len(runners))``, each round in random order.

    ``rounds`` is ``iterations``, or fewer with a ``deadline`` (a ``time.perf_counter()`` value):
    rounds stop once it has passed and ``min_iterations`` rounds are done (the cost model's
    time budget, ``factorlm.costmodel``).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    if min(iterations, min_iterations) < 3:
        raise ValueError("at least 3 iterations are needed for percentiles and a bootstrap")
    count = len(runners)
    for _ in range(warmup):
        for runner in runners:
            runner.infer(feeds)
    times = np.empty((iterations, count), dtype=np.float64)
    done = 0
    while done < iterations:
        if deadline is not None and done >= min_iterations and time.perf_counter() >= deadline:
            break
        for j in rng.permutation(count):
            runners[j].infer(feeds)
            elapsed = runners[j].last_inference_time
            times[done, j] = float(elapsed) if elapsed is not None else np.nan
        if on_iteration is not None:
            on_iteration(done)
        done += 1
    return times[:done]


def latency_summary(seconds: np.ndarray, batch: int) -> dict[str, Any]:
    """Percentiles in milliseconds and throughput in sequences per second."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    return {
        "samples_ms": [round(float(v), 6) for v in ms],
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": mean,
        "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        "throughput_per_s": batch * 1e3 / mean if mean > 0 else float("inf"),
    }


def bootstrap_median(
    values: np.ndarray,
    *,
    rng: np.random.Generator,
    resamples: int = 2000,
    confidence: float = 0.95,
) -> Interval:
    """Median of ``values`` with a percentile-bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    boots = _boot_medians(values, rng, resamples)
    return _interval(float(np.median(values)), boots, confidence)


def speedup_interval(
    reference_s: np.ndarray,
    candidate_s: np.ndarray,
    *,
    rng: np.random.Generator,
    resamples: int = 2000,
    confidence: float = 0.95,
) -> Interval:
    """Median per-pair speedup ``t_ref / t_cand`` (>1 means the candidate is faster)."""
    ratios = np.asarray(reference_s, np.float64) / np.asarray(candidate_s, np.float64)
    return bootstrap_median(ratios, rng=rng, resamples=resamples, confidence=confidence)


def regression_interval(
    current: tuple[np.ndarray, np.ndarray],
    baseline: tuple[np.ndarray, np.ndarray],
    *,
    rng: np.random.Generator,
    basis: str = "reference",
    resamples: int = 2000,
    confidence: float = 0.95,
) -> Interval:
    """How much slower the candidate is now than in the baseline, as a fraction (0.05 = 5 %).

    ``current`` and ``baseline`` are ``(reference_s, candidate_s)`` paired samples. With
    ``basis="reference"`` the compared quantity is the median of ``t_cand / t_ref`` per run; with
    ``"absolute"`` it is the median of ``t_cand``. Both runs are resampled independently.
    """
    if basis == "reference":
        now = np.asarray(current[1], np.float64) / np.asarray(current[0], np.float64)
        before = np.asarray(baseline[1], np.float64) / np.asarray(baseline[0], np.float64)
    elif basis == "absolute":
        now = np.asarray(current[1], np.float64)
        before = np.asarray(baseline[1], np.float64)
    else:
        raise ValueError(f"unknown regression basis {basis!r}")
    ratio = _boot_medians(now, rng, resamples) / _boot_medians(before, rng, resamples)
    estimate = float(np.median(now) / np.median(before)) - 1.0
    return _interval(estimate, ratio - 1.0, confidence)


def _boot_medians(values: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    index = rng.integers(0, values.size, size=(resamples, values.size))
    return np.median(values[index], axis=1)


def _interval(estimate: float, boots: np.ndarray, confidence: float) -> Interval:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(boots, [tail, 100.0 - tail])
    return Interval(estimate, float(low), float(high), confidence)


def environment_info() -> dict[str, Any]:
    """CPU, cores, OS and library versions: what a latency number means nothing without."""
    versions: dict[str, str] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": versions,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
