"""``measure_alternating``: every runner once per round in a fresh order, rounds bounded by time.

The cost model (``factorlm.costmodel``) times its small graphs with this same loop, bounded by a
deadline; the benchmark uses a fixed number of rounds. No wall-clock thresholds: a deadline in
the past or far in the future makes the round count exact.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from factorlm.bench.latency import measure_alternating
from factorlm.bench.runners import BaseRunner


class _Logged(BaseRunner):
    """A runner that does nothing but log its name in a shared list."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(Path(name), name)
        self.log = log

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.log.append(self.name)
        return {}


def _runners(count: int) -> tuple[list[BaseRunner], list[str]]:
    log: list[str] = []
    runners: list[BaseRunner] = [_Logged(f"r{i}", log) for i in range(count)]
    for runner in runners:
        runner.__enter__()
    return runners, log


def test_every_round_runs_each_runner_once_in_a_fresh_order() -> None:
    runners, log = _runners(3)
    times = measure_alternating(runners, {}, warmup=2, iterations=40, rng=np.random.default_rng(0))
    assert times.shape == (40, 3) and np.all(times >= 0)
    rounds = [log[6 + 3 * i : 9 + 3 * i] for i in range(40)]  # after 2 warm-up rounds
    assert all(sorted(r) == ["r0", "r1", "r2"] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # the order changes between rounds


def test_a_deadline_stops_after_the_minimum_rounds() -> None:
    runners, log = _runners(2)
    past = measure_alternating(
        runners, {}, warmup=0, iterations=30, deadline=time.perf_counter() - 1.0, min_iterations=5
    )
    assert past.shape == (5, 2) and len(log) == 10
    future = measure_alternating(
        runners, {}, warmup=0, iterations=7, deadline=time.perf_counter() + 3600.0
    )
    assert future.shape == (7, 2)  # the deadline never cuts below iterations otherwise
    with pytest.raises(ValueError, match="3 iterations"):
        measure_alternating(runners, {}, iterations=2)
    with pytest.raises(ValueError, match="3 iterations"):
        measure_alternating(runners, {}, iterations=10, min_iterations=1)
