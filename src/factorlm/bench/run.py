"""``run_benchmark``: latency, fidelity, task metrics and goals of candidates against a reference.

The work is a loop over typed stages (``factorlm.bench.stages.STAGES``: latency, task, fidelity,
report, goals), each a small class that reads and fills one ``BenchContext``. Everything a user can
get wrong is checked by ``factorlm.bench.prepare`` before the first timed inference, and the slow
stages report progress through one callback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
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
from factorlm.bench.report import Report
from factorlm.bench.stages import STAGES
from factorlm.options import BenchOptions

__all__ = [
    "DEFAULT_MAX_REGRESSION",
    "STAGES",
    "BenchContext",
    "BenchStage",
    "Progress",
    "parse_model_arg",
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
    **overrides: Any,
) -> Report:
    """Benchmark ``candidates`` against ``reference`` and judge the goals.

    Models are paths (file, export folder or engine folder) or ``NAME=PATH``. ``options``
    (``BenchOptions``) says how to measure; keyword ``overrides`` replace single options
    (``run_benchmark(ref, [cand], shapes=["1x128"], iterations=10)``). Goals come from
    ``options.goals_file``, ``goals`` (Goal objects, a mapping or a YAML path) and the goal
    options; a baseline (``options.baseline`` or a loaded report mapping) without an explicit
    ``max_regression`` gates at 5 %. Raises ``FactorlmError`` subclasses on usage errors.
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
        for stage in STAGES:
            stage.run(ctx)
    return Report(ctx.data, ctx.results)
