"""What the benchmark stages share: one ``BenchContext`` they read and fill, and their protocol."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from factorlm.bench.accuracy import FidelityAccumulator
from factorlm.bench.decode import DecodePoint, DecoderLayout
from factorlm.bench.feeds import Shape
from factorlm.bench.goals import Goal, GoalResult
from factorlm.bench.runners import BaseRunner
from factorlm.bench.tasks import Dataset
from factorlm.options import BenchOptions

__all__ = ["BenchContext", "BenchStage", "Progress"]

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


@dataclass
class BenchContext:
    """What the stages share: the validated inputs, the open runners and the report sections."""

    options: BenchOptions
    runners: list[BaseRunner]
    task: str | None
    dataset: Dataset | None
    goals: list[Goal]
    baseline: Mapping[str, Any] | None
    grid: list[Shape]
    vocab: int | None
    feed_rng: np.random.Generator
    boot_rng: np.random.Generator
    order_rng: np.random.Generator
    progress: Progress | None = None
    # the task stage's reference: a replay or recording of ctx.reference (bench.replay), or None
    task_reference: BaseRunner | None = None
    # held around every timed section (a sweep's node lock: the CPUs to this benchmark alone)
    timing_guard: Callable[[], AbstractContextManager[Any]] | None = None
    decoder: DecoderLayout | None = None  # the KV-cache layout of a decoder exported with past
    points: list[DecodePoint] = field(default_factory=list)  # its prefill/decode latency grid
    engines: dict[str, Any] = field(default_factory=dict)  # size on disk and session memory
    latency: list[dict[str, Any]] = field(default_factory=list)
    random_fidelity: list[FidelityAccumulator] = field(default_factory=list)
    data_fidelity: list[FidelityAccumulator] = field(default_factory=list)
    task_result: dict[str, Any] | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    results: list[GoalResult] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> BaseRunner:
        return self.runners[0]

    @property
    def candidates(self) -> list[BaseRunner]:
        return self.runners[1:]

    def timed(self) -> AbstractContextManager[Any]:
        """The timing guard's block, or a no-op without one."""
        return self.timing_guard() if self.timing_guard is not None else nullcontext()

    @property
    def task_runners(self) -> list[BaseRunner]:
        """The runners the task stage scores: latency always times the real reference."""
        return [self.task_reference or self.reference, *self.candidates]


class BenchStage(Protocol):
    """One step of the benchmark: reads the context, fills its own part of it."""

    name: ClassVar[str]

    def run(self, ctx: BenchContext) -> None: ...
