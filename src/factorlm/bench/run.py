"""``run_benchmark``: latency, fidelity, task metrics and goals of candidates against a reference.

The work is a loop over typed stages (``factorlm.bench.stages.STAGES``: latency, task, fidelity,
report, goals), each a small class that reads and fills one ``BenchContext``. Everything a user can
get wrong is checked by ``factorlm.bench.prepare`` before the first timed inference, and the slow
stages report progress through one callback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

from factorlm.bench.context import BenchContext, BenchStage, Progress
from factorlm.bench.goals import Goal
from factorlm.bench.prepare import (
    DEFAULT_MAX_REGRESSION,
    open_runners,
    parse_model_arg,
    prepare_context,
    resolve_options,
)
from factorlm.bench.replay import (
    DEFAULT_BUDGET_BYTES,
    UNREPLAYED_TASKS,
    RecordingRunner,
    ReplayRunner,
)
from factorlm.bench.report import Report
from factorlm.bench.stages import STAGES, TaskStage
from factorlm.options import BenchOptions, replace

__all__ = [
    "DEFAULT_MAX_REGRESSION",
    "STAGES",
    "BenchContext",
    "BenchStage",
    "Progress",
    "parse_model_arg",
    "record_reference",
    "run_benchmark",
]

logger = logging.getLogger(__name__)


def run_benchmark(
    reference: str | Path,
    candidates: Sequence[str | Path | tuple[str, str | Path]],
    options: BenchOptions | None = None,
    *,
    data: str | Path | None = None,
    goals: Sequence[Goal] | Mapping[str, Any] | Path | str | None = None,
    baseline: Mapping[str, Any] | str | Path | None = None,
    progress: Progress | None = None,
    reference_record: str | Path | None = None,
    timing_guard: Callable[[], AbstractContextManager[Any]] | None = None,
    **overrides: Any,
) -> Report:
    """Benchmark ``candidates`` against ``reference`` and judge the goals.

    Models are paths (file, export folder or engine folder) or ``NAME=PATH``. ``options``
    (``BenchOptions``) says how to measure; keyword ``overrides`` replace single options
    (``run_benchmark(ref, [cand], shapes=["1x128"], iterations=10)``). Goals come from
    ``options.goals_file``, ``goals`` (Goal objects, a mapping or a YAML path) and the goal
    options; a baseline (``options.baseline`` or a loaded report mapping) without an explicit
    ``max_regression`` gates at 5 %. ``reference_record``: a folder ``record_reference`` wrote
    for this reference engine; the task stage replays the reference's outputs from it (latency
    still times the real engine). ``timing_guard``: entered around every timed section only
    (a sweep's node lock), not around the untimed task scoring. Raises ``FactorlmError`` subclasses on usage errors.
    """
    if isinstance(baseline, str | Path):
        overrides["baseline"] = Path(baseline)
        baseline = None
    if isinstance(goals, str | Path):
        overrides["goals_file"] = Path(goals)
        goals = None
    opts = resolve_options(options, overrides)
    ctx = prepare_context(
        reference,
        candidates,
        opts,
        Path(data) if data is not None else None,
        goals,
        baseline,
        progress,
    )
    with ExitStack() as stack:
        open_runners(ctx, stack, Path(parse_model_arg(reference)[1]))
        if reference_record is not None and ctx.task not in UNREPLAYED_TASKS:
            ctx.task_reference = ReplayRunner(ctx.reference, Path(reference_record))
        ctx.timing_guard = timing_guard
        for stage in STAGES:
            stage.run(ctx)
    return Report(ctx.data, ctx.results)


def record_reference(
    reference: str | Path,
    out: str | Path,
    options: BenchOptions | None = None,
    *,
    data: str | Path,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the task on ``reference`` alone and record its outputs into ``out`` for replay.

    Returns the reference's task result (also written to ``out/task.json``) plus what the
    record holds. Goals and baselines do not apply to a lone reference and are ignored.
    """
    opts = replace(
        resolve_options(options, overrides),
        goals_file=None,
        max_accuracy_drop=None,
        min_speedup=None,
        max_fidelity_loss=None,
        max_regression=None,
        baseline=None,
    )
    out = Path(out)
    ctx = prepare_context(reference, [reference], opts, Path(data), None, None, None)
    ctx.runners = ctx.runners[:1]  # the reference alone: no candidate session is opened
    with ExitStack() as stack:
        stack.enter_context(ctx.reference)  # no latency grid, no memory probe: the task only
        recorder = RecordingRunner(ctx.reference, out, budget_bytes=budget_bytes)
        ctx.task_reference = recorder
        TaskStage().run(ctx)
        recorded = recorder.close()
    result = {"task": ctx.task_result, "record": recorded}
    (out / "task.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return result
