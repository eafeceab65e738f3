"""The timing guard (a sweep's node lock) covers the timed latency rounds, not the task scoring."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from factorlm.bench.run import run_benchmark


def test_guard_is_held_while_timing_and_released_while_scoring(
    models: dict[str, Path], reviews: Path
) -> None:
    held = [False]
    seen: list[tuple[str, bool]] = []
    entered = [0]

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        entered[0] += 1
        held[0] = True
        try:
            yield
        finally:
            held[0] = False

    def progress(label: str, done: int, total: int) -> None:
        seen.append((label.split()[0], held[0]))

    report = run_benchmark(
        models["ref"], [models["noisy"]], data=reviews, task="classification",
        shapes=["1x8", "2x8"], iterations=3, warmup=0, progress=progress, timing_guard=guard,
    )  # fmt: skip
    assert report.data["task"]["reference"] > 0
    assert entered[0] == 1 and not held[0]
    assert {h for label, h in seen if label == "latency"} == {True}
    assert {h for label, h in seen if label == "embedding"} == {False}
