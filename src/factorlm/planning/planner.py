"""``make_plan``: choose a factorization for every analysed weight under one budget.

``make_plan`` is a pure function of the analysed weights, optional calibration statistics and a
budget. It checks the options, sorts the weights (include/exclude patterns, embeddings, linear)
and hands the linear ones to the low-rank or the Kronecker planner. Numbers (spectra, global
rank allocation, break-even) come from ``factorlm.decompose``; planning only chooses and counts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from factorlm.decompose import PreparedWeight
from factorlm.decompose.rank import DEFAULT_MIN_FRACTION, STRATEGIES
from factorlm.errors import ConfigError
from factorlm.planning.kronecker import plan_kronecker
from factorlm.planning.latency import LatencyModel
from factorlm.planning.lowrank import plan_embedding, plan_low_rank, statistics_for
from factorlm.planning.schema import (
    ALL_METHODS,
    DATA_AWARE,
    SPARSE_STRUCTURES,
    AnalysisLike,
    CandidateLike,
    Plan,
    StatsLike,
)

__all__ = ["make_plan"]

logger = logging.getLogger(__name__)


def _matches(pattern: re.Pattern[str], name: str, nodes: Sequence[str]) -> bool:
    return bool(pattern.search(name)) or any(pattern.search(node) for node in nodes)


def _compile(pattern: str | None, option: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"{option} pattern {pattern!r} is not a valid regular expression ({exc})."
        ) from None


def make_plan(
    analysis: AnalysisLike,
    *,
    method: str = "svd",
    ratio: float = 0.5,
    energy: float | None = None,
    rank_multiple: int = 8,
    include: str | None = None,
    exclude: str | None = None,
    embeddings: float | None = None,
    stats: StatsLike | None = None,
    sparse_structure: str = "column",
    sparse_density: float = 0.05,
    allocation: str = "optimal",
    error_scale: str = "relative",
    min_fraction: float = DEFAULT_MIN_FRACTION,
    prepared: dict[str, PreparedWeight] | None = None,
    latency: LatencyModel | None = None,
    target_ms: float | None = None,
) -> Plan:
    """Choose a factorization for every analysed weight under one budget.

    ``ratio`` is the fraction of the targeted linear weights' parameters that remains, spent
    globally by ``allocate_ranks`` over the (data-aware when ``stats``) spectra; ``energy``
    instead keeps that fraction of each weight's spectral energy. ``embeddings`` is the ratio for
    token embeddings (None leaves them dense). Weights whose best rank would not reduce their cost
    stay dense, with the reason in ``Plan.skipped``.

    ``allocation``, ``error_scale`` and ``min_fraction`` choose how ``allocate_ranks`` spends the
    budget (default: the exact optimum of the summed relative errors with no factorized weight
    below half its break-even rank; see benchmarks/results/allocation.md). Spectra are the
    eigenvalues of each weight's small-side Gram (``decompose.prepare``, no SVD); when
    ``prepared`` is a dict, the prepared weights of the factorized entries are stored in it so
    that ``compress`` builds their factors from one ``eigh`` of the same Gram.

    ``method="kron"`` spends the same budget on sums of Kronecker products whose FLOPs per token
    never exceed the dense weight's (``planning.kronecker.plan_kronecker``): a Kronecker form's FLOPs, as a
    fraction of dense, are at least twice its parameters' fraction, so kron plans cost about as
    many FLOPs as dense at ratios above 0.5 and fewer below. ``allocation`` "lagrangian" is
    honoured there; every other strategy uses the exact knapsack.

    ``latency`` (a measured ``planning.LatencyModel``) with ``target_ms`` plans for a predicted
    whole-model latency instead of ``ratio`` (which is then ignored): every method, each form
    priced by its own measured curves (low-rank, low-rank + sparse, joint Q/K/V, Kronecker
    splits), embeddings left dense; the plan records the prediction (``Plan.latency``,
    per-weight ``dense_ms``/``predicted_ms``).
    """
    if method not in ALL_METHODS:
        raise ConfigError(f"method {method!r} is unknown; use one of {', '.join(ALL_METHODS)}.")
    if not (isinstance(ratio, int | float) and 0.0 < ratio < 1.0):
        raise ConfigError(f"ratio {ratio!r} is out of range: it must be strictly between 0 and 1.")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ConfigError(f"energy {energy!r} is out of range: it must be in (0, 1].")
    if embeddings is not None and not 0.0 < embeddings < 1.0:
        raise ConfigError(f"embeddings ratio {embeddings!r} is out of range: it must be in (0, 1).")
    if rank_multiple < 1:
        raise ConfigError(f"rank multiple {rank_multiple!r} must be a positive integer.")
    if allocation not in STRATEGIES:
        raise ConfigError(
            f"allocation {allocation!r} is unknown; use one of {', '.join(STRATEGIES)}."
        )
    if error_scale not in ("relative", "absolute"):
        raise ConfigError(f"error scale {error_scale!r} is unknown; use 'relative' or 'absolute'.")
    if not 0.0 <= min_fraction <= 1.0:
        raise ConfigError(f"min fraction {min_fraction!r} is out of range: it must be in [0, 1].")
    if method == "losparse":
        if sparse_structure not in SPARSE_STRUCTURES:
            raise ConfigError(
                f"sparse structure {sparse_structure!r} is unknown; use one of {', '.join(SPARSE_STRUCTURES)}."
            )
        if not 0.0 <= sparse_density < ratio:
            raise ConfigError(f"sparse density {sparse_density!r} must be in [0, ratio {ratio}).")
    if (latency is None) != (target_ms is None):
        raise ConfigError("a latency target needs both the latency model and target_ms.")
    if latency is not None and (energy is not None or embeddings is not None):
        raise ConfigError(
            "a latency target plans the linear weights' ranks itself: leave energy and "
            "embeddings unset."
        )
    if method in DATA_AWARE and stats is None:
        statistics_for(None, method, "")
    inc, exc = _compile(include, "--include"), _compile(exclude, "--exclude")
    if inc is not None:
        names = [(c.name, c.node_names) for c in analysis.candidates]
        names += [(s.name, list(s.nodes)) for s in analysis.skipped]
        if not any(_matches(inc, n, nodes) for n, nodes in names):
            raise ConfigError(
                f"--include pattern {include!r} matches no weight or node of the model."
            )

    plan = Plan(
        method=method,
        budget={
            "ratio": ratio,
            "energy": energy,
            "rank_multiple": rank_multiple,
            "embeddings": embeddings,
            "allocation": allocation,
            "error_scale": error_scale,
            "min_fraction": min_fraction,
            "include": include,
            "exclude": exclude,
            **(
                {"sparse_structure": sparse_structure, "sparse_density": sparse_density}
                if method == "losparse"
                else {}
            ),
        },
        skipped={s.name: s.reason for s in analysis.skipped},
    )
    if target_ms is not None:
        plan.budget["target_ms"] = target_ms
    linear: list[CandidateLike] = []
    for cand in analysis.candidates:
        if inc is not None and not _matches(inc, cand.name, cand.node_names):
            plan.skipped[cand.name] = f"not matched by --include {include!r}"
        elif exc is not None and _matches(exc, cand.name, cand.node_names):
            plan.skipped[cand.name] = f"excluded by --exclude {exclude!r}"
        elif cand.kind == "embedding":
            plan_embedding(plan, cand, embeddings, rank_multiple, method, stats)
        else:
            linear.append(cand)
    target = (latency, float(target_ms)) if latency is not None and target_ms is not None else None
    if method == "kron":
        plan_kronecker(plan, linear, ratio, (allocation, error_scale, min_fraction), target)
    else:
        plan_low_rank(
            plan,
            linear,
            method,
            ratio,
            energy,
            rank_multiple,
            stats,
            sparse_structure,
            sparse_density,
            (allocation, error_scale, min_fraction),
            prepared,
            target,
        )
    logger.info("Planned %d weights, %d left dense", len(plan.weights), len(plan.skipped))
    return plan
