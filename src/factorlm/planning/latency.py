"""Ranks under a latency target: measured per-shape curves, interpolated, spent like a budget.

A low-rank pair ``x @ L @ R`` is faster than ``x @ W`` only below a rank that depends on the
shape, the engine, the precision and the token count, not on FLOPs alone, so the cost of every
candidate rank comes from measurement (``factorlm.costmodel`` times small ONNX graphs on the
engine). This module holds the pure part: a ``LatencyCurve`` per weight shape (a few measured
ranks, piecewise-linear in between), a ``LatencyModel`` (the curves plus the measured latency of
the whole dense model) and ``allocate_latency``, which picks per weight a rank or dense so that

    predicted = model_ms + Σ_w calls_w · (factored_w(r_w) − dense_w)   ≤ target_ms

while minimising the same summed (relative) truncation error as the parameter allocation
(``decompose.allocate_ranks``). Only differences to dense enter the prediction, so the fixed
overhead of running a small graph cancels. A rank whose factored pair is not faster than dense
is dominated (more latency and more error) and never chosen: such weights stay dense.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from factorlm.decompose import DecompositionError, WeightSpectrum, break_even_rank, round_rank
from factorlm.decompose.rank import DEFAULT_MIN_FRACTION, WeightOptions, allocate_options
from factorlm.errors import ConfigError

__all__ = [
    "LatencyAllocation",
    "LatencyCurve",
    "LatencyModel",
    "allocate_latency",
    "measured_ranks",
    "shape_key",
]

logger = logging.getLogger(__name__)

#: Budget resolution of the exact knapsack: the dense weights' summed latency in this many units.
_RESOLUTION = 4000


def shape_key(shape: Sequence[int]) -> str:
    """``(384, 1536)`` -> ``"384x1536"`` (the key of a curve in a ``LatencyModel``)."""
    return f"{int(shape[0])}x{int(shape[1])}"


def measured_ranks(m: int, n: int, multiple: int, points: int = 7) -> list[int]:
    """The ranks to measure for an ``(m, n)`` weight: ~``points`` multiples up to break-even.

    Every rank the planner may choose (multiples of ``multiple`` up to the parameter break-even)
    lies between the first and the last, so interpolation never extrapolates.
    """
    top = (break_even_rank(m, n) // multiple) * multiple
    if top < multiple:
        return []
    grid = np.linspace(multiple, top, max(2, points))
    return sorted({round_rank(round(float(r) / multiple) * multiple, multiple) for r in grid})


@dataclass(frozen=True)
class LatencyCurve:
    """Measured milliseconds of one weight shape: dense, and factored at a few ranks."""

    shape: tuple[int, int]
    dense_ms: float
    ranks: tuple[int, ...]
    factored_ms: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.ranks) != len(self.factored_ms) or not self.ranks:
            raise ConfigError(f"latency curve {shape_key(self.shape)} needs one time per rank.")
        if any(b <= a for a, b in zip(self.ranks, self.ranks[1:], strict=False)):
            raise ConfigError(f"latency curve {shape_key(self.shape)}: ranks must ascend.")

    def at(self, rank: int) -> float:
        """Factored milliseconds at ``rank``: exact at measured ranks, linear in between.

        Outside the measured range the nearest segment is extended (planning queries stay
        inside it; see ``measured_ranks``).
        """
        ranks = np.asarray(self.ranks, dtype=np.float64)
        times = np.asarray(self.factored_ms, dtype=np.float64)
        if ranks.size == 1:
            return float(times[0])
        if rank <= ranks[0] or rank >= ranks[-1]:
            i = 0 if rank <= ranks[0] else ranks.size - 2
            slope = (times[i + 1] - times[i]) / (ranks[i + 1] - ranks[i])
            return float(times[i] + slope * (rank - ranks[i]))
        return float(np.interp(rank, ranks, times))

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dense_ms": self.dense_ms,
            "ranks": list(self.ranks),
            "factored_ms": list(self.factored_ms),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyCurve:
        shape = data["shape"]
        return cls(
            shape=(int(shape[0]), int(shape[1])),
            dense_ms=float(data["dense_ms"]),
            ranks=tuple(int(r) for r in data["ranks"]),
            factored_ms=tuple(float(t) for t in data["factored_ms"]),
        )


@dataclass(frozen=True)
class LatencyModel:
    """The curves of every weight shape and the measured latency of the whole dense model."""

    model_ms: float
    curves: Mapping[str, LatencyCurve]
    config: Mapping[str, Any] = field(default_factory=dict)

    def curve(self, shape: Sequence[int]) -> LatencyCurve | None:
        return self.curves.get(shape_key(shape))


@dataclass(frozen=True)
class LatencyAllocation:
    """Chosen ranks (None = dense) and the predicted milliseconds, per weight and in total."""

    ranks: dict[str, int | None]
    weight_ms: dict[str, float]  # predicted ms of each weight as chosen (dense or factored)
    dense_ms: dict[str, float]  # measured ms of each weight left dense
    predicted_ms: float
    model_ms: float
    target_ms: float

    @property
    def predicted_speedup(self) -> float:
        return self.model_ms / self.predicted_ms if self.predicted_ms > 0 else float("inf")


def _options(
    spec: WeightSpectrum,
    curve: LatencyCurve,
    calls: int,
    multiple: int,
    min_fraction: float,
    error: str,
) -> tuple[list[int | None], list[float], list[float]]:
    """Undominated (rank, ms, error) options of one weight, cheapest first, dense last."""
    m, n = spec.shape
    even = break_even_rank(m, n)
    low = round_rank(max(1, math.ceil(min_fraction * even)), multiple)
    s = np.sort(np.asarray(spec.singular_values, dtype=np.float64))[::-1]
    tail = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])
    if error == "relative" and tail[0] > 0:
        tail = tail / tail[0]
    found = [
        (r, calls * curve.at(r), float(tail[min(r, tail.size - 1)]))
        for r in range(low, even + 1, multiple)
    ]
    dense = calls * curve.dense_ms
    ranks: list[int | None] = []
    costs: list[float] = []
    errors: list[float] = []
    best = math.inf
    for r, ms, err in sorted(found, key=lambda t: (t[1], t[2])):
        if ms < dense and err < best:  # otherwise dominated by dense or a cheaper rank
            ranks.append(r)
            costs.append(ms)
            errors.append(err)
            best = err
    return [*ranks, None], [*costs, dense], [*errors, 0.0]


def allocate_latency(
    spectra: Sequence[WeightSpectrum],
    model: LatencyModel,
    *,
    target_ms: float,
    calls: Mapping[str, int] | None = None,
    multiple: int = 8,
    error: str = "relative",
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> LatencyAllocation:
    """Ranks minimising the summed truncation error with predicted latency ≤ ``target_ms``.

    A weight whose shape has no curve in ``model`` stays dense (None); ``calls`` counts the
    products a weight runs per inference (default 1). The knapsack is exact on a grid of
    ``1/4000`` of the dense weights' latency, with costs rounded up and the budget rounded down,
    so the prediction never exceeds the target. ``min_fraction`` (of the parameter break-even
    rank) is a floor, dropped when the target cannot be met with it. Raises ``ConfigError``
    naming the fastest predicted latency when the target is out of reach.
    """
    calls = calls or {}
    if not (math.isfinite(target_ms) and target_ms > 0):
        raise ConfigError(f"target latency {target_ms!r} ms must be a positive number.")
    curves: dict[str, LatencyCurve] = {}
    for spec in spectra:
        curve = model.curve(spec.shape)
        if curve is not None:
            curves[spec.name] = curve
        else:  # too small for any rank of the grid: dense, its time inside the rest
            logger.info("no latency curve for %s %s: left dense", spec.name, spec.shape)
    missing = [s.name for s in spectra if s.name not in curves]
    spectra = [s for s in spectra if s.name in curves]
    dense_ms = {s.name: calls.get(s.name, 1) * curves[s.name].dense_ms for s in spectra}
    rest = model.model_ms - sum(dense_ms.values())
    budget = target_ms - rest

    def options_at(floor: float) -> dict[str, tuple[list[int | None], list[float], list[float]]]:
        return {
            s.name: _options(s, curves[s.name], calls.get(s.name, 1), multiple, floor, error)
            for s in spectra
        }

    def fastest(options: Mapping[str, tuple[Any, list[float], Any]]) -> float:
        return rest + sum(costs[0] for _, costs, _ in options.values())

    floor = float(min_fraction)
    options = options_at(floor)
    if fastest(options) > target_ms:
        lowest = fastest(options_at(0.0))
        if lowest > target_ms:
            raise ConfigError(
                f"target latency {target_ms:.3f} ms is out of reach: the fastest plan is predicted "
                f"at {lowest:.3f} ms ({model.model_ms / lowest:.2f}x of the dense "
                f"{model.model_ms:.3f} ms); lower the target speedup."
            )
        # The floor is a preference (as in allocate_ranks): the highest one that meets the target.
        low, high = 0.0, floor
        for _ in range(20):
            mid = 0.5 * (low + high)
            if fastest(options_at(mid)) <= target_ms:
                low = mid
            else:
                high = mid
        floor = low
        options = options_at(floor)
        logger.info(
            "min_fraction %.3g lowered to %.3g to meet %.3f ms", min_fraction, floor, target_ms
        )
    choice: dict[str, int] = {}
    total_dense = sum(dense_ms.values())
    if spectra and total_dense > 0:
        unit = total_dense / _RESOLUTION
        cap = math.floor(budget / unit + 1e-9)
        weights: list[WeightOptions] = []
        for name, (_, costs, errors) in options.items():
            units = [math.ceil(c / unit - 1e-9) for c in costs]
            keep = [i for i in range(len(units)) if i + 1 == len(units) or units[i] < units[i + 1]]
            weights.append(
                WeightOptions(
                    name,
                    np.asarray([units[i] for i in keep]),
                    np.asarray([errors[i] for i in keep]),
                )
            )
            options[name] = (
                [options[name][0][i] for i in keep],
                [costs[i] for i in keep],
                [errors[i] for i in keep],
            )
        original = sum(int(w.costs[-1]) for w in weights)
        try:
            choice = allocate_options(weights, ratio=max(cap, 0) / original if original else 1.0)
        except DecompositionError:
            # The rounding ate the slack: the fastest options alone meet the target.
            choice = {name: 0 for name in options}
    ranks: dict[str, int | None] = dict.fromkeys(missing)
    weight_ms: dict[str, float] = {}
    for name, (rank_options, costs, _) in options.items():
        index = choice.get(name, len(rank_options) - 1)
        ranks[name] = rank_options[index]
        weight_ms[name] = costs[index]
    predicted = rest + sum(weight_ms.values())
    logger.info(
        "latency plan: %.3f ms predicted (target %.3f, dense %.3f), %d of %d weights factorized",
        predicted,
        target_ms,
        model.model_ms,
        sum(r is not None for r in ranks.values()),
        len(ranks),
    )
    return LatencyAllocation(
        ranks=ranks,
        weight_ms=weight_ms,
        dense_ms=dense_ms,
        predicted_ms=predicted,
        model_ms=model.model_ms,
        target_ms=target_ms,
    )
