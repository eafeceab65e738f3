"""Small pure helpers behind ``benchmarks/quality.py``: budgets, orderings and target verdicts.

Why here and not in the script: these decide what the quality table *claims* (the linear-parameter
ratio a point really kept, whether the published ordering holds, whether a target is met), so they
are tested on their own; everything that loads models or runs ONNX Runtime stays in the script.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from factorlm.options import DATA_AWARE_METHODS

__all__ = [
    "DATA_AWARE_METHODS",
    "Ordering",
    "best_under",
    "kept_linear_ratio",
    "method_ordering",
]

logger = logging.getLogger(__name__)

# DATA_AWARE_METHODS (re-exported): the one definition lives in factorlm.options.


def kept_linear_ratio(linear_params: int, params_before: int, params_after: int) -> float:
    """Fraction of *all* linear-layer parameters left after factorization.

    ``compress`` reports costs of the weights it factorized only; weights the global allocation
    left dense still count, so the whole-model linear ratio is
    ``(linear - before + after) / linear``.
    """
    if linear_params <= 0:
        raise ValueError(f"linear parameter count {linear_params} must be positive")
    if not 0 <= params_before <= linear_params or params_after < 0:
        raise ValueError(
            f"factorized parameters {params_before} -> {params_after} do not fit in {linear_params}"
        )
    return (linear_params - params_before + params_after) / linear_params


@dataclass(frozen=True)
class Ordering:
    """Methods ranked best first at one budget, and whether the published ordering holds."""

    budget: float
    ranked: tuple[str, ...]
    svd_worst: bool
    data_aware_best: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "ranked": list(self.ranked),
            "svd_worst": self.svd_worst,
            "data_aware_best": self.data_aware_best,
        }


def method_ordering(
    scores: Mapping[str, float], budget: float, *, higher_is_better: bool
) -> Ordering:
    """Rank methods by score at one budget (ties keep input order); NaN scores rank last."""

    def key(item: tuple[int, str]) -> tuple[int, float, int]:
        index, name = item
        value = float(scores[name])
        if value != value:  # NaN: a collapsed or failed point
            return (1, 0.0, index)
        return (0, -value if higher_is_better else value, index)

    ranked = tuple(name for _, name in sorted(enumerate(scores), key=key))
    return Ordering(
        budget=budget,
        ranked=ranked,
        svd_worst=bool(ranked) and ranked[-1] == "svd",
        data_aware_best=bool(ranked) and ranked[0] in DATA_AWARE_METHODS,
    )


def best_under(
    points: Sequence[Mapping[str, Any]],
    *,
    objective: str,
    constraint: str,
    limit: float,
    at_least: bool,
    maximize: bool,
) -> Mapping[str, Any] | None:
    """The point with the best ``objective`` among those whose ``constraint`` meets ``limit``.

    ``at_least`` means the constraint is ``value >= limit`` (e.g. speedup >= 1.5), else
    ``value <= limit`` (e.g. accuracy drop <= 1). A value within ``1e-9`` of the limit meets it:
    73.9 - 72.9 is 1.0000000000000142 in floating point, and a drop of exactly one point is
    within one point. Returns None when no point qualifies.
    """
    slack = 1e-9

    def ok(point: Mapping[str, Any]) -> bool:
        value = point.get(constraint)
        if value is None or value != value:
            return False
        return float(value) >= limit - slack if at_least else float(value) <= limit + slack

    def has_objective(point: Mapping[str, Any]) -> bool:
        value = point.get(objective)
        return value is not None and value == value  # NaN: not measured

    eligible = [p for p in points if ok(p) and has_objective(p)]
    if not eligible:
        return None
    pick = max if maximize else min
    return pick(eligible, key=lambda p: float(p[objective]))
