"""Latency measured on the engine, for planning ranks under a latency target (issue 17).

``measure_latency_model`` times small generated ONNX graphs (``graphs``) on ONNX Runtime and
the dense whole model once, and caches the results per machine, library versions and engine
configuration (``measure``). The pure part (curves, interpolation, the latency-budget
allocation) lives in ``factorlm.planning.latency``; this package is the measuring side, so
planning imports no onnxruntime. ``latency_target`` is the hook ``compress`` calls.

Every method has measured curves of its own form (``latency_curves``): the low-rank pair,
low-rank + sparse, a joint Q/K/V group (one shared left factor, one right factor per member)
and each Kronecker split. A decoder planned for decode (``EngineConfig.past``) is timed for one
step against a KV cache of that length. Not latency-planned: token embeddings (leave
``embeddings`` unset with a target).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from factorlm.costmodel.measure import (
    COSTMODEL_FORMAT,
    PROBE_FRACTION,
    CostModelRun,
    EngineConfig,
    Progress,
    machine,
    measure_latency_model,
    probe_ranks,
    savings_scale,
)
from factorlm.options import CompressOptions
from factorlm.planning import (
    KRON_SHAPES,
    CandidateLike,
    LatencyModel,
    supports_kronecker,
    supports_lowrank_sparse,
)
from factorlm.planning.latency import CurveSpec, candidate_spec, kron_specs

__all__ = [
    "COSTMODEL_FORMAT",
    "PROBE_FRACTION",
    "CostModelRun",
    "EngineConfig",
    "engine_config",
    "latency_curves",
    "latency_probe",
    "latency_target",
    "machine",
    "measure_latency_model",
    "probe_ranks",
    "savings_scale",
]

logger = logging.getLogger(__name__)


def engine_config(options: CompressOptions) -> EngineConfig:
    """The engine configuration a compress option set asks to plan for.

    ``latency_past`` > 0 (with a ``Bx1`` shape): one decode step against that many cached
    positions.
    """
    batch, seq = (int(v) for v in options.latency_shape.lower().split("x"))
    return EngineConfig(
        batch=batch,
        seq=seq,
        precision=options.latency_precision,
        threads=options.latency_threads,
        optimize=options.latency_optimize,
        past=options.latency_past,
    )


def latency_curves(
    candidates: Sequence[CandidateLike],
    method: str,
    multiple: int,
    *,
    sparse: tuple[str, float] = ("column", 0.05),
) -> list[CurveSpec]:
    """The curves a plan of ``candidates`` with ``method`` is priced by (one per distinct form).

    Kronecker: every examined split of each weight the rewrite applies to; low-rank + sparse:
    its structure and density on the weights it applies to; otherwise the low-rank pair, and a
    joint Q/K/V group's joint form (timed as one pair when the engine fuses Attention).
    """
    found: dict[str, CurveSpec] = {}
    for cand in candidates:
        if cand.kind != "linear":
            continue
        if method == "kron":
            if supports_kronecker(cand) is None and not cand.members:
                found.update((s.key, s) for s in kron_specs(cand.shape, KRON_SHAPES))
            continue
        if method == "losparse" and (supports_lowrank_sparse(cand) is not None or cand.members):
            continue
        spec = candidate_spec(cand, method, multiple, sparse=sparse)
        if spec is not None:
            found.setdefault(spec.key, spec)
    return list(found.values())


def latency_probe(
    candidates: Sequence[CandidateLike], method: str, multiple: int
) -> list[tuple[CandidateLike, CurveSpec]]:
    """The weights the savings-scale probe factors, with their curves: every linear weight a
    low-rank-pair method plans (Kronecker and low-rank + sparse forms are not probed: their
    curves are used as measured)."""
    if method in ("kron", "losparse"):
        return []
    found = []
    for cand in candidates:
        spec = candidate_spec(cand, method, multiple) if cand.kind == "linear" else None
        if spec is not None:
            found.append((cand, spec))
    return found


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
    latency. Cached measurements are reused (see ``measure``). Low-rank methods also time one
    factored probe of the model, whose saving scales the curves' (``LatencyModel.savings_scale``).
    """
    config = engine_config(options)
    curves = latency_curves(
        candidates,
        options.method,
        options.rank_multiple,
        sparse=(options.sparse_structure, options.sparse_density),
    )
    run = measure_latency_model(
        model,
        curves,
        config,
        multiple=options.rank_multiple,
        budget_s=options.latency_budget_s,
        cache_dir=cache_dir,
        progress=progress,
        probe=latency_probe(candidates, options.method, options.rank_multiple),
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
