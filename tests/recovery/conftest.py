"""Recovery fixtures: a CPU clock that advances a fixed amount per call, to test time budgets."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


@pytest.fixture
def fake_cpu_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """``install(tick)``: ``time.process_time`` then advances ``tick`` seconds per call, so a
    training step (two calls) costs ``tick`` CPU seconds whatever the machine's load."""

    def install(tick: float) -> None:
        now = [0.0]

        def process_time() -> float:
            now[0] += tick
            return now[0]

        monkeypatch.setattr(time, "process_time", process_time)

    return install
