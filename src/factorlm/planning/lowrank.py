"""Low-rank planning: ranks for linear weights under one global budget, and token embeddings.

Numbers (spectra, global rank allocation, break-even) come from ``factorlm.decompose``; this
module only chooses ranks and records them. Low-rank + sparse (``losparse``) spends part of each
weight's budget on the sparse residual, in one of ``SPARSE_STRUCTURES``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TypedDict

import numpy as np

from factorlm.decompose import (
    PreparedWeight,
    WeightSpectrum,
    allocate_ranks,
    break_even_rank,
    prepare,
    rank_for_energy,
    round_rank,
    spectrum,
)
from factorlm.decompose.rank import DEFAULT_MIN_FRACTION
from factorlm.errors import ConfigError, PlanError
from factorlm.planning.costs import dense_cost, fill_costs, relative_error
from factorlm.planning.latency import CurveSpec, LatencyModel, allocate_latency, candidate_spec
from factorlm.planning.schema import DATA_AWARE, CandidateLike, Plan, StatsLike, new_entry

__all__ = [
    "lookup_weight",
    "plan_embedding",
    "plan_low_rank",
    "statistics_for",
    "supports_lowrank_sparse",
]

logger = logging.getLogger(__name__)


def supports_lowrank_sparse(candidate: CandidateLike) -> str | None:
    """None when the low-rank + sparse rewrite applies, else the reason it does not.

    The plan and ``factorlm.passes.LowRankSparsePass`` both apply this one rule.
    """
    if candidate.kind != "linear" or candidate.uses[0].form != "x@W":
        return f"the low-rank + sparse rewrite needs MatMul(x, W), not {candidate.uses[0].form}"
    return None


class FactorStatistics(TypedDict):
    """What a data-aware method reads for one weight: ``factorlm.decompose`` keyword arguments."""

    gram: np.ndarray | None
    mean_abs: np.ndarray | None
    fisher: np.ndarray | None
    output_weight: np.ndarray | None
    output_gram: np.ndarray | None


def statistics_for(stats: StatsLike | None, method: str, name: str) -> FactorStatistics:
    """The statistic a data-aware method needs for one weight, as decompose keyword arguments.

    Loss-aware whiten/drone: the full output-gradient Gram (``output_gram``) where the stats hold
    one for the weight, else the diagonal output Fisher (``output_weight``), never both.
    """
    found = FactorStatistics(
        gram=None, mean_abs=None, fisher=None, output_weight=None, output_gram=None
    )
    key = DATA_AWARE.get(method)
    if key is None:
        return found
    loss_aware = method in ("whiten", "drone")
    full = getattr(stats, "output_gram", None) if loss_aware else None
    output = getattr(stats, "output_fisher", None) if loss_aware else None
    if full and name in full:  # loss-aware whitening, both sides full
        found["output_gram"] = full[name]
    elif output and name in output:  # loss-aware whitening: weight each output feature
        found["output_weight"] = output[name]
    if stats is None:
        raise ConfigError(
            f"method {method!r} needs calibration statistics ({key}): pass --calib DATA (with "
            "--tokenizer) or --stats STATS.npz."
        )
    table: Mapping[str, np.ndarray] = getattr(stats, key)
    if name not in table:
        raise PlanError(f"the calibration statistics have no {key} for weight {name!r}.")
    found[key] = table[name]  # type: ignore[literal-required]
    return found


def lookup_weight(stats: StatsLike | None, name: str) -> np.ndarray | None:
    """Per-row weight of a tied embedding ``E``: how often calibration looked each token up, + 1.

    Whitening by the head's inputs alone leaves the looked-up rows far off (SmolLM2, rank 448:
    perplexity 75 against 46 dense); weighting the rows (the core's output features, decompose's
    ``output_weight``) by their counts keeps them (49.7). The +1 keeps every token in the
    objective, so the head still ranks unseen tokens. None without counts for ``name``.
    """
    counts = (getattr(stats, "token_counts", None) or {}).get(name)
    return None if counts is None else np.asarray(counts, dtype=np.float64) + 1.0


def factor_statistics(
    stats: StatsLike | None, method: str, name: str, *, embedding: bool = False
) -> FactorStatistics:
    """``statistics_for`` plus a tied embedding's lookup weights: the decompose keyword arguments
    of one weight, as planned here and as ``compress`` (or a replayed plan) factorizes it.

    A whiten/drone embedding without loss-aware statistics weights its rows by their lookups.
    """
    found = statistics_for(stats, method, name)
    plain = found["output_weight"] is None and found["output_gram"] is None
    if embedding and method in ("whiten", "drone") and plain:  # loss-aware statistics first
        found["output_weight"] = lookup_weight(stats, name)
    return found


def plan_embedding(
    plan: Plan,
    cand: CandidateLike,
    ratio: float | None,
    multiple: int,
    method: str = "svd",
    stats: StatsLike | None = None,
) -> None:
    """Plan a token embedding at its own ``ratio`` (None leaves it dense).

    An LM head tied to the embedding (a decoder's ``logits = h @ Eᵀ``) shares its factors and is
    the entry's FLOPs (``fill_costs``); the candidate then has the head's orientation (``Eᵀ``).
    With a data-aware ``method`` whose statistic calibration collected for that head (the Gram of
    its input, the final norm's output), the factors minimise the error of the logits rather than
    of ``E``, and whiten/drone also weight each row by its lookups (``lookup_weight``): an
    embedding's spectrum is flat, and on SmolLM2-135M at rank 448 plain SVD takes perplexity
    from 46 to ~6e4, the head-whitened factors to 75, both weightings to 49.7. Otherwise SVD.
    """
    tied = any(use.form != "gather" for use in cand.uses)
    if ratio is None:
        what = "token embedding and the LM head tied to it" if tied else "token embedding"
        plan.skipped[cand.name] = (
            f"{what} left dense (set --embeddings RATIO to factorize {'both' if tied else 'it'})"
        )
        return
    m, n = cand.shape
    limit = break_even_rank(m, n)
    rank = (int(ratio * m * n / (m + n)) // multiple) * multiple
    if rank < 1 or rank > limit:
        plan.skipped[cand.name] = (
            f"no rank multiple of {multiple} below break-even {limit} fits ratio {ratio}"
        )
        return
    chosen = _embedding_method(cand, method, stats) if tied else "svd"
    s = spectrum(
        cand.matrix(), chosen, **factor_statistics(stats, chosen, cand.name, embedding=True)
    )
    entry = new_entry(cand, chosen, rank=rank, expected_error=relative_error(s, rank))
    fill_costs(cand, entry)
    plan.weights[cand.name] = entry


def _embedding_method(cand: CandidateLike, method: str, stats: StatsLike | None) -> str:
    """``method`` when it is data-aware and the tied head's statistic is there, else "svd"."""
    key = DATA_AWARE.get(method)
    if key is None:
        return "svd"
    table = getattr(stats, key, None) if stats is not None else None
    if table and cand.name in table:
        return method
    logger.warning(
        "The calibration statistics have no %s for the LM head tied to %s (a --stats file from "
        "before tied heads were calibrated, or a method whose statistic does not cover them); "
        "factorizing it by plain SVD, which loses far more accuracy than whitening by the head's "
        "inputs.",
        key,
        cand.name,
    )
    return "svd"


def plan_low_rank(
    plan: Plan,
    linear: list[CandidateLike],
    method: str,
    ratio: float,
    energy: float | None,
    multiple: int,
    stats: StatsLike | None,
    structure: str,
    density: float,
    options: tuple[str, str, float] = ("optimal", "relative", DEFAULT_MIN_FRACTION),
    prepared: dict[str, PreparedWeight] | None = None,
    latency: tuple[LatencyModel, float] | None = None,
) -> None:
    """Ranks for ``linear`` by energy or by the global allocation; the rest stays dense.

    ``options`` is ``(allocation, error_scale, min_fraction)`` for ``allocate_ranks``.
    ``latency`` = ``(model, target_ms)`` replaces the parameter budget by a latency target
    (``planning.latency.allocate_latency``) and records the predictions in the plan; each weight
    is predicted by the measured curve of its form (``planning.latency.candidate_spec``).
    """
    core_method = "svd" if method == "losparse" else method
    targets: list[CandidateLike] = []
    for cand in linear:
        reason = supports_lowrank_sparse(cand) if method == "losparse" else None
        if reason is None and method == "losparse" and cand.members:
            reason = "a joint Q/K/V weight takes plain low-rank factors only, not low-rank + sparse"
        if reason is not None:
            plan.skipped[cand.name] = reason
        else:
            targets.append(cand)
    spectra: dict[str, np.ndarray] = {}
    specs: dict[str, CurveSpec] = {}  # a latency plan's curve per weight
    cache: dict[str, PreparedWeight] = {}
    for cand in targets:
        found = statistics_for(stats, core_method, cand.name)
        # Eigenvalues of the small-side Gram only; compress takes the vectors (one eigh) for
        # the weights the allocation factorizes, so no vectors are held in between.
        ready = prepare(cand.matrix(), core_method, keep=0, **found)
        spectra[cand.name] = ready.singular_values
        if prepared is not None and method != "losparse":
            cache[cand.name] = ready
    if energy is not None:
        ranks: dict[str, int | None] = {}
        for cand in targets:
            m, n = cand.shape
            r = round_rank(rank_for_energy(spectra[cand.name], energy), multiple)
            ranks[cand.name] = r if r <= break_even_rank(m, n) else None
    elif latency is not None:
        fused = latency[0].attention_fused
        for c in targets:
            spec = candidate_spec(c, method, multiple, sparse=(structure, density), fused=fused)
            if spec is not None:
                specs[c.name] = spec
        found_ms = allocate_latency(
            [WeightSpectrum(c.name, c.shape, spectra[c.name]) for c in targets],
            latency[0],
            target_ms=latency[1],
            calls={c.name: _linear_calls(c) for c in targets},
            multiple=multiple,
            error=options[1],
            min_fraction=options[2],
            specs=specs,
        )
        ranks = found_ms.ranks
        plan.latency = {
            "target_ms": found_ms.target_ms,
            "model_ms": found_ms.model_ms,
            "predicted_ms": found_ms.predicted_ms,
            "predicted_speedup": found_ms.predicted_speedup,
            "dense_weights": {k: v for k, v in found_ms.dense_ms.items() if ranks[k] is None},
            "config": dict(latency[0].config),
        }
    else:
        # losparse spends part of each weight's budget on the sparse part.
        lr_ratio = ratio - density if method == "losparse" else ratio
        ranks = (
            allocate_ranks(
                [WeightSpectrum(c.name, c.shape, spectra[c.name]) for c in targets],
                ratio=lr_ratio,
                multiple=multiple,
                strategy=options[0],  # type: ignore[arg-type]
                error=options[1],  # type: ignore[arg-type]
                min_fraction=options[2],
            )
            if targets
            else {}
        )
    for cand in targets:
        chosen = ranks.get(cand.name)
        m, n = cand.shape
        limit = break_even_rank(m, n)
        if chosen is None:
            plan.dense[cand.name] = dense_cost(cand)
            if limit < multiple:
                plan.skipped[cand.name] = (
                    f"would not reduce cost: break-even rank {limit} is below the rank multiple {multiple}"
                )
            elif latency is not None:
                plan.skipped[cand.name] = (
                    "left dense by the latency plan (no measured rank is faster than dense, or "
                    "cutting it costs the most error)"
                )
            elif energy is not None:
                plan.skipped[cand.name] = (
                    f"would not reduce cost: energy {energy} needs a rank above break-even {limit}"
                )
            else:
                plan.skipped[cand.name] = (
                    "left dense by the global rank allocation (cutting it costs the most error)"
                )
            continue
        sparse = {"structure": structure, "density": density} if method == "losparse" else None
        entry = new_entry(
            cand,
            method,
            rank=chosen,
            sparse=sparse,
            expected_error=relative_error(spectra[cand.name], chosen),
        )
        fill_costs(cand, entry)
        if latency is not None:
            curve = latency[0].curve(specs.get(cand.name, cand.shape))
            if curve is not None:
                calls = _linear_calls(cand)
                entry.dense_ms = calls * curve.dense_ms
                entry.predicted_ms = calls * curve.at(chosen)
        plan.weights[cand.name] = entry
        if prepared is not None and cand.name in cache:
            prepared[cand.name] = cache.pop(cand.name)


def _linear_calls(cand: CandidateLike) -> int:
    """Products a weight runs per inference (a joint Q/K/V weight: one, like ``fill_costs``)."""
    return 1 if cand.members else max(1, sum(1 for u in cand.uses if u.form != "gather"))
