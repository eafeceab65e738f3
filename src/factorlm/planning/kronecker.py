"""Kronecker planning: sums of Kronecker products under one parameter budget, never above dense FLOPs.

A Kronecker form's FLOPs, as a fraction of dense, are at least twice its parameters' fraction,
so kron plans cost about as many FLOPs as dense at ratios above 0.5 and fewer below. Shapes,
costs and spectra come from ``factorlm.decompose``; the allocation is its multiple-choice knapsack.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from factorlm.decompose import (
    DecompositionError,
    WeightOptions,
    allocate_options,
    kronecker_cost,
    kronecker_spectrum,
    propose_kronecker_shapes,
)
from factorlm.decompose.rank import DEFAULT_MIN_FRACTION
from factorlm.errors import ConfigError
from factorlm.planning.costs import dense_cost, fill_costs
from factorlm.planning.latency import (
    LatencyChoices,
    LatencyModel,
    choices_front,
    kron_spec,
    kron_term_limit,
    spend_latency,
)
from factorlm.planning.schema import CandidateLike, Plan, new_entry

__all__ = ["KRON_SHAPES", "plan_kronecker", "supports_kronecker"]

logger = logging.getLogger(__name__)

#: Kronecker splits examined per weight: the ones with the fewest FLOPs per parameter.
KRON_SHAPES = 4


def supports_kronecker(candidate: CandidateLike) -> str | None:
    """None when the Kronecker rewrite applies, else the reason it does not.

    The plan and ``factorlm.passes.KroneckerPass`` both apply this one rule.
    """
    if candidate.kind != "linear" or candidate.uses[0].form != "x@W":
        return f"the Kronecker rewrite needs MatMul(x, W), not {candidate.uses[0].form}"
    return None


@dataclass(frozen=True)
class _KronOption:
    params: int
    flops: int
    tail: float  # squared Frobenius error Σ s[t:]² of the Kronecker spectrum
    kron: dict[str, Any]


@dataclass(frozen=True)
class _KronSplit:
    """One factor shape of a weight: per-term costs, its FLOP break-even and its spectrum tail."""

    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    per_params: int
    per_flops: int
    most: int  # the most terms below dense in parameters and not above dense in FLOPs
    tail: np.ndarray  # tail[t] = Σ s[t:]²


def _kron_splits(cand: CandidateLike, matrix: np.ndarray) -> list[_KronSplit]:
    """The ``KRON_SHAPES`` splits with the fewest FLOPs per parameter that beat dense at all.

    For every split FLOPs are at least the parameters (``decompose.kronecker``), so these are
    the shapes that store the most for what they compute.
    """
    m, n = cand.shape
    found: list[_KronSplit] = []
    for a_shape, b_shape in propose_kronecker_shapes(m, n, limit=KRON_SHAPES, by="flops"):
        per_params, per_flops = kronecker_cost(a_shape, b_shape, 1)
        most = kron_term_limit((m, n), a_shape, b_shape)
        if most < 1:
            continue
        power = kronecker_spectrum(matrix, a_shape) ** 2
        tail = np.concatenate([np.cumsum(power[::-1])[::-1], [0.0]])
        found.append(_KronSplit(a_shape, b_shape, per_params, per_flops, most, tail))
    return found


def _kron_front(splits: list[_KronSplit], min_fraction: float) -> list[_KronOption]:
    """Term counts from ``min_fraction`` of each split's break-even up to it, on the front.

    Among forms of equal parameters the lower error wins, then the lower FLOPs; a form is kept
    only when it removes error that every cheaper form leaves.
    """
    found: list[_KronOption] = []
    for split in splits:
        low = max(1, math.ceil(min_fraction * split.most))
        for t in range(low, split.most + 1):
            kron = {"a_shape": list(split.a_shape), "b_shape": list(split.b_shape), "terms": t}
            tail = float(split.tail[min(t, split.tail.size - 1)])
            found.append(_KronOption(t * split.per_params, t * split.per_flops, tail, kron))
    found.sort(key=lambda o: (o.params, o.tail, o.flops))
    front: list[_KronOption] = []
    for option in found:
        if front and (option.params == front[-1].params or option.tail >= front[-1].tail):
            continue
        front.append(option)
    return front


def _latency_choices(
    cand: CandidateLike,
    splits: list[_KronSplit],
    model: LatencyModel,
    scale: float,
    fraction: float,
) -> LatencyChoices | None:
    """A weight's Kronecker forms priced by their measured curves (None: no curve measured).

    Every split's curve times the dense product too; a form costs the mean dense time plus its
    own curve's difference to dense (measured in pairs), so the splits share one dense cost.
    """
    curves = [(s, model.curve(kron_spec(cand.shape, s.a_shape, s.b_shape, s.most))) for s in splits]
    priced = [(s, c) for s, c in curves if c is not None]
    if not priced:
        return None
    dense = float(np.mean([c.dense_ms for _, c in priced]))
    found = []
    for split, curve in priced:
        for t in range(max(1, math.ceil(fraction * split.most)), split.most + 1):
            kron = {"a_shape": list(split.a_shape), "b_shape": list(split.b_shape), "terms": t}
            tail = float(split.tail[min(t, split.tail.size - 1)])
            found.append((kron, dense + curve.at(t) - curve.dense_ms, tail * scale))
    return choices_front(found, dense)


def _plan_latency(
    plan: Plan,
    targets: list[CandidateLike],
    splits: dict[str, list[_KronSplit]],
    energy: dict[str, float],
    scales: dict[str, float],
    min_fraction: float,
    latency: tuple[LatencyModel, float],
) -> None:
    """Kronecker forms under a latency target: the plan's entries and its prediction."""
    model, target_ms = latency
    missing = [
        c.name for c in targets if _latency_choices(c, splits[c.name], model, 1.0, 0.0) is None
    ]

    def options_at(fraction: float) -> dict[str, LatencyChoices]:
        found = {
            c.name: _latency_choices(c, splits[c.name], model, scales[c.name], fraction)
            for c in targets
            if c.name not in missing
        }
        return {name: f for name, f in found.items() if f is not None}

    spent = spend_latency(
        options_at,
        model_ms=model.model_ms,
        target_ms=target_ms,
        min_fraction=min_fraction,
        missing=missing,
    )
    plan.latency = {
        "target_ms": spent.target_ms,
        "model_ms": spent.model_ms,
        "predicted_ms": spent.predicted_ms,
        "predicted_speedup": spent.predicted_speedup,
        "dense_weights": {k: v for k, v in spent.dense_ms.items() if spent.ranks[k] is None},
        "config": dict(model.config),
    }
    for cand in targets:
        kron = spent.ranks.get(cand.name)
        if kron is None:
            plan.dense[cand.name] = dense_cost(cand)
            plan.skipped[cand.name] = (
                "left dense by the latency plan (no measured Kronecker form is faster than "
                "dense, or cutting it costs the most error)"
            )
            continue
        split = next(s for s in splits[cand.name] if list(s.a_shape) == kron["a_shape"])
        tail = float(split.tail[min(int(kron["terms"]), split.tail.size - 1)])
        total = energy[cand.name]
        error = math.sqrt(tail / total) if total > 0 else 0.0
        entry = new_entry(cand, "kron", kron=dict(kron), expected_error=error)
        fill_costs(cand, entry)
        entry.dense_ms = spent.dense_ms[cand.name]
        entry.predicted_ms = spent.weight_ms[cand.name]
        plan.weights[cand.name] = entry


def plan_kronecker(
    plan: Plan,
    linear: list[CandidateLike],
    ratio: float,
    options: tuple[str, str, float] = ("optimal", "relative", DEFAULT_MIN_FRACTION),
    latency: tuple[LatencyModel, float] | None = None,
) -> None:
    """Sums of Kronecker products under one parameter budget, never above dense FLOPs.

    A weight's options are dense and, for each of its FLOP-cheapest splits (``_kron_splits``),
    every term count from ``min_fraction`` of the split's FLOP break-even (the most terms whose
    FLOPs do not exceed dense) up to it: the analogue of the low-rank floor at a fraction of the
    break-even rank, lowered as far as needed when the ratio cannot be met with it. The
    low-rank allocation's multiple-choice knapsack picks one option per weight, minimising the
    summed (relative) squared error within ``ratio`` of the targeted parameters.

    ``latency`` = ``(model, target_ms)`` replaces the parameter budget by a latency target: each
    form is priced by its split's measured curve (``planning.latency.kron_spec``) and the same
    error is minimised under the predicted latency (``planning.latency.spend_latency``).
    """
    allocation, error_scale, min_fraction = options
    splits: dict[str, list[_KronSplit]] = {}
    scales: dict[str, float] = {}
    energy: dict[str, float] = {}
    for cand in linear:
        reason = supports_kronecker(cand)
        if reason is None and cand.members:
            reason = "a joint Q/K/V weight takes low-rank factors only, not Kronecker ones"
        if reason is not None:
            plan.skipped[cand.name] = reason
            continue
        matrix = cand.matrix()  # read once: streamed weights come from disk on every call
        splits[cand.name] = _kron_splits(cand, matrix)
        total = float(np.sum(matrix.astype(np.float64) ** 2))
        energy[cand.name] = total
        scales[cand.name] = 1.0 / total if error_scale == "relative" and total > 0 else 1.0
    targets = [c for c in linear if c.name in splits]
    if not targets:
        return
    if latency is not None:
        _plan_latency(plan, targets, splits, energy, scales, min_fraction, latency)
        return

    def fronts(fraction: float) -> dict[str, list[_KronOption]]:
        return {name: _kron_front(found, fraction) for name, found in splits.items()}

    def floor_cost(found: dict[str, list[_KronOption]]) -> int:
        return sum(
            found[c.name][0].params if found[c.name] else c.shape[0] * c.shape[1] for c in targets
        )

    dense_total = sum(c.shape[0] * c.shape[1] for c in targets)
    chosen = fronts(min_fraction)
    if floor_cost(chosen) > ratio * dense_total and min_fraction > 0:
        low, high = 0.0, float(min_fraction)
        for _ in range(20):
            mid = 0.5 * (low + high)
            if floor_cost(fronts(mid)) <= ratio * dense_total:
                low = mid
            else:
                high = mid
        logger.info(
            "kron: min_fraction %.3g infeasible at ratio %s; lowered to %.3g",
            min_fraction,
            ratio,
            low,
        )
        chosen = fronts(low)
    weights = [
        WeightOptions(
            c.name,
            np.asarray([o.params for o in chosen[c.name]] + [c.shape[0] * c.shape[1]], np.int64),
            np.asarray([o.tail * scales[c.name] for o in chosen[c.name]] + [0.0]),
        )
        for c in targets
    ]
    try:
        picked = allocate_options(
            weights, ratio=ratio, strategy="lagrangian" if allocation == "lagrangian" else "optimal"
        )
    except DecompositionError as exc:
        raise ConfigError(f"method 'kron': {exc}") from None
    for cand in targets:
        found, index = chosen[cand.name], picked[cand.name]
        if index >= len(found):
            plan.dense[cand.name] = dense_cost(cand)
            m, n = cand.shape
            plan.skipped[cand.name] = (
                "left dense by the global Kronecker allocation (cutting it costs the most error)"
                if found
                else f"no Kronecker split of {m}x{n} is cheaper than dense in parameters and FLOPs"
            )
            continue
        option = found[index]
        total = energy[cand.name]
        error = math.sqrt(option.tail / total) if total > 0 else 0.0
        entry = new_entry(cand, "kron", kron=dict(option.kron), expected_error=error)
        fill_costs(cand, entry)
        plan.weights[cand.name] = entry
