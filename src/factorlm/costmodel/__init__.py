"""Latency measured on the engine, for planning ranks under a latency target (issue 17).

``measure_latency_model`` times small generated ONNX graphs (``graphs``) on ONNX Runtime and
the dense whole model once, and caches the results per machine, library versions and engine
configuration (``measure``). The pure part (curves, interpolation, the latency-budget
allocation) lives in ``factorlm.planning.latency``; this package is the measuring side, so
planning imports no onnxruntime. ``latency_target`` is the hook ``compress`` calls.

Not latency-planned: Kronecker and low-rank + sparse factors (no measured curves; their options
refuse a target), and token embeddings (leave ``embeddings`` unset with a target).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from factorlm.costmodel.measure import (
    COSTMODEL_FORMAT,
    CostModelRun,
    EngineConfig,
    Progress,
    machine,
    measure_latency_model,
)
from factorlm.options import CompressOptions
from factorlm.planning import CandidateLike, LatencyModel

__all__ = [
    "COSTMODEL_FORMAT",
    "CostModelRun",
    "EngineConfig",
    "engine_config",
    "latency_target",
    "machine",
    "measure_latency_model",
]

logger = logging.getLogger(__name__)


def engine_config(options: CompressOptions) -> EngineConfig:
    """The engine configuration a compress option set asks to plan for."""
    batch, seq = (int(v) for v in options.latency_shape.lower().split("x"))
    return EngineConfig(
        batch=batch,
        seq=seq,
        precision=options.latency_precision,
        threads=options.latency_threads,
        optimize=options.latency_optimize,
    )


def latency_target(
    model: str | os.PathLike[str],
    candidates: Sequence[CandidateLike],
    options: CompressOptions,
    *,
    progress: Progress | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[LatencyModel, float]:
    """The measured latency model of ``model``'s linear weights and the target in ms.

    ``options.target_latency_ms`` is taken as is; ``target_speedup`` divides the measured dense
    latency. Cached measurements are reused (see ``measure``).
    """
    config = engine_config(options)
    shapes = [c.shape for c in candidates if c.kind == "linear"]
    run = measure_latency_model(
        model,
        shapes,
        config,
        multiple=options.rank_multiple,
        budget_s=options.latency_budget_s,
        cache_dir=cache_dir,
        progress=progress,
    )
    if options.target_latency_ms is not None:
        target = float(options.target_latency_ms)
    else:
        assert options.target_speedup is not None
        target = run.model.model_ms / float(options.target_speedup)
    logger.info(
        "latency target %.3f ms on %s (dense model %.3f ms; %d items measured, %d cached, %.1f s)",
        target,
        config.label,
        run.model.model_ms,
        len(run.measured),
        len(run.cached),
        run.seconds,
    )
    if target >= run.model.model_ms:
        logger.warning(
            "the dense model already runs in %.3f ms, within the target %.3f ms: nothing to cut.",
            run.model.model_ms,
            target,
        )
    return run.model, target
