"""Rank selection: break-even, energy, alignment, and a global allocation under a budget.

Costs (per weight ``(m, n)``): dense ``m·n`` parameters and ``2·m·n`` FLOPs per token; rank r
``r·(m + n)`` and ``2·r·(m + n)``. Factorizing pays only below the break-even rank
``r < m·n / (m + n)``.

``allocate_ranks`` gives every weight one option: dense, or a multiple of ``multiple`` below
break-even (optionally no lower than ``min_fraction`` of break-even). Its objective is the sum
over weights of the truncation error ``Σ_{i ≥ r} s_i²`` of that weight's (data-aware) spectrum,
by default *relative* to the weight's total energy ``Σ s_i²`` (so a weight with small activations
does not look cheap: for whitened spectra this is the relative output error on calibration
data), subject to ``cost ≤ ratio · original``. Strategies:

- ``optimal``: exact multiple-choice knapsack by dynamic programming over costs in units of their
  greatest common divisor (costs are multiples of ``multiple·(m + n)`` and ``m·n``, so the table
  is small: about 2,000 columns for all-MiniLM-L6-v2). Falls back to ``lagrangian`` when the
  table would be too large.
- ``lagrangian``: for a multiplier λ each weight picks the option minimising ``err + λ·cost``;
  sweeping λ up is a greedy walk along each weight's lower convex hull of (cost, err) in order of
  smallest added error per saved unit (dense included as an option, so the non-convex first step
  "dense → just below break-even" is priced fairly against cutting other weights). The walk stops
  at the first hull point within budget (optimal for its own cost, Everett 1963), then a
  fill-back spends the slack on the upgrades that remove the most error per unit.
- ``greedy``: the earlier walk over every step of ``multiple`` from dense (kept for comparison;
  it crushes weights it has "opened" because the first step is expensive).
- ``uniform``: the same fraction of every weight's dense cost (the largest fraction that fits).

The default floor ``min_fraction = 0.5`` (no factorized weight below half its break-even rank)
measured best on all-MiniLM-L6-v2: the summed-error objective alone cuts a few weights very
deep, and the errors of deeply cut layers compound through the network. A floor that makes the
ratio infeasible is lowered as far as needed. Ties are broken by the weights' order, so every
strategy is deterministic.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Literal

import numpy as np

from factorlm.decompose._validate import DecompositionError

__all__ = [
    "DEFAULT_MIN_FRACTION",
    "STRATEGIES",
    "Budget",
    "ErrorScale",
    "Strategy",
    "WeightOptions",
    "WeightSpectrum",
    "allocate_options",
    "allocate_ranks",
    "allocation_cost",
    "allocation_error",
    "break_even_rank",
    "rank_for_energy",
    "round_rank",
]

logger = logging.getLogger(__name__)

Budget = Literal["params", "flops"]
Strategy = Literal["optimal", "lagrangian", "greedy", "uniform"]
ErrorScale = Literal["relative", "absolute"]
STRATEGIES: tuple[str, ...] = ("optimal", "lagrangian", "greedy", "uniform")

#: Default floor: no factorized weight below half its break-even rank. Measured best on
#: all-MiniLM-L6-v2 (benchmarks/results/allocation.md): the summed-error objective alone cuts a
#: few weights very deep, and errors of deeply cut layers compound through the network.
DEFAULT_MIN_FRACTION = 0.5

#: Largest dynamic-programming table (weights × budget units) that ``optimal`` builds.
_DP_MAX_CELLS = 20_000_000


@dataclass(frozen=True, eq=False)
class WeightSpectrum:
    """One weight's singular values (of the matrix its method truncates) and shape ``(in, out)``.

    ``tokens_per_call`` multiplies the weight's FLOPs in a ``flops`` budget (an embedding whose
    factor runs on fewer tokens, or a head that runs on more); it is ignored for ``params``.
    """

    name: str
    shape: tuple[int, int]
    singular_values: np.ndarray
    tokens_per_call: int = 1


def break_even_rank(m: int, n: int) -> int:
    """Largest r with ``r·(m + n) < m·n`` (0 when no rank saves anything)."""
    if m < 1 or n < 1:
        raise DecompositionError(f"shape ({m}, {n}) must have positive dimensions.")
    return (m * n - 1) // (m + n)


def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """Smallest r ≥ 1 whose leading singular values hold ``energy`` of ``Σ s²``."""
    if not 0.0 < energy <= 1.0:
        raise DecompositionError(f"energy must be in (0, 1], got {energy!r}.")
    values = _check_spectrum(np.asarray(s), "s")
    power = np.cumsum(values**2)
    total = power[-1] if power.size else 0.0
    if total == 0.0:
        return 1
    # A relative slack absorbs the rounding of the cumulative sum at energy == 1.
    r = int(np.searchsorted(power, energy * total * (1 - 1e-12), side="left")) + 1
    return max(1, min(r, values.size))


def round_rank(r: int, multiple: int) -> int:
    """Round ``r`` up to a positive multiple of ``multiple`` (tensor-core friendly)."""
    if multiple < 1:
        raise DecompositionError(f"multiple must be a positive integer, got {multiple!r}.")
    return max(multiple, -(-int(r) // multiple) * multiple)


def _check_spectrum(s: np.ndarray, name: str) -> np.ndarray:
    if s.ndim != 1:
        raise DecompositionError(f"singular values of {name} must be 1-D, got shape {s.shape}.")
    values = s.astype(np.float64)
    if not np.isfinite(values).all() or (values < 0).any():
        raise DecompositionError(f"singular values of {name} must be finite and non-negative.")
    return np.sort(values)[::-1]


@dataclass
class _Layer:
    """One weight's options, cheapest first: factorized ranks ascending, then dense (None)."""

    index: int
    name: str
    unit: int  # cost of one rank (params: m + n; flops: 2·tpc·(m + n))
    ranks: list[int | None]
    costs: np.ndarray  # int64, ascending; costs[-1] is the dense cost
    errors: np.ndarray  # float64, errors[-1] == 0 (dense)
    choice: int = -1  # index into ranks

    @property
    def dense(self) -> int:
        return len(self.ranks) - 1

    @property
    def cost(self) -> int:
        return int(self.costs[self.choice])


def _lowest_rank(even: int, multiple: int, min_fraction: float) -> int:
    """Smallest allowed factorized rank: a multiple of ``multiple``, ≥ min_fraction·break-even."""
    return round_rank(max(1, math.ceil(min_fraction * even)), multiple)


def _layers(
    spectra: Sequence[WeightSpectrum],
    budget: Budget,
    multiple: int,
    min_fraction: float = 0.0,
    error: ErrorScale = "relative",
) -> list[_Layer]:
    layers: list[_Layer] = []
    seen: set[str] = set()
    for index, spec in enumerate(spectra):
        if spec.name in seen:
            raise DecompositionError(f"weight {spec.name!r} appears twice in the spectra.")
        seen.add(spec.name)
        if len(spec.shape) != 2 or min(spec.shape) < 1:
            raise DecompositionError(f"weight {spec.name!r} has an invalid shape {spec.shape}.")
        m, n = int(spec.shape[0]), int(spec.shape[1])
        s = _check_spectrum(np.asarray(spec.singular_values), repr(spec.name))
        if s.size > min(m, n):
            raise DecompositionError(
                f"weight {spec.name!r} has {s.size} singular values but shape {spec.shape} allows "
                f"at most {min(m, n)}."
            )
        if spec.tokens_per_call < 0:
            raise DecompositionError(f"weight {spec.name!r} has negative tokens_per_call.")
        scale = 1 if budget == "params" else 2 * int(spec.tokens_per_call)
        even = break_even_rank(m, n)
        low = _lowest_rank(even, multiple, min_fraction)
        factorized = list(range(low, even + 1, multiple)) if scale > 0 else []
        tail = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])
        if error == "relative" and tail[0] > 0:
            tail = tail / tail[0]
        errors = [float(tail[min(r, tail.size - 1)]) for r in factorized] + [0.0]
        unit = scale * (m + n)
        costs = [r * unit for r in factorized] + [scale * m * n]
        ranks: list[int | None] = [*factorized, None]
        layers.append(
            _Layer(
                index,
                spec.name,
                unit,
                ranks,
                np.asarray(costs, dtype=np.int64),
                np.asarray(errors, dtype=np.float64),
            )
        )
    return layers


def allocation_cost(
    spectra: Sequence[WeightSpectrum], ranks: dict[str, int | None], budget: Budget = "params"
) -> int:
    """Total parameters (or FLOPs per call) of ``spectra`` under ``ranks`` (None = dense)."""
    total = 0
    for spec in spectra:
        m, n = spec.shape
        scale = 1 if budget == "params" else 2 * spec.tokens_per_call
        r = ranks.get(spec.name)
        total += scale * (m * n if r is None else r * (m + n))
    return total


def allocation_error(
    spectra: Sequence[WeightSpectrum],
    ranks: dict[str, int | None],
    error: ErrorScale = "relative",
) -> float:
    """The allocation objective: Σ over weights of the (relative) squared truncation error."""
    total = 0.0
    for spec in spectra:
        r = ranks.get(spec.name)
        if r is None:
            continue
        power = np.sort(np.asarray(spec.singular_values, dtype=np.float64))[::-1] ** 2
        tail = float(power[r:].sum())
        energy = float(power.sum())
        total += tail / energy if error == "relative" and energy > 0 else tail
    return total


def allocate_ranks(
    spectra: Sequence[WeightSpectrum],
    *,
    ratio: float,
    budget: Budget = "params",
    multiple: int = 8,
    strategy: Strategy = "optimal",
    error: ErrorScale = "relative",
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> dict[str, int | None]:
    """Ranks minimising the summed truncation error so that the cost is ≤ ``ratio`` of dense.

    Returns ``name -> rank`` (a multiple of ``multiple`` below break-even, at least
    ``min_fraction`` of break-even, a floor that is lowered as far as needed when the ratio
    cannot be met with it) or None for weights kept dense. ``strategy`` and ``error``
    are described in the module docstring. Raises ``DecompositionError`` (a ``ValueError``) when
    ``ratio`` cannot be met, naming the smallest feasible ratio.
    """
    if budget not in ("params", "flops"):
        raise DecompositionError(f"budget {budget!r} is unknown; use 'params' or 'flops'.")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise DecompositionError(f"multiple must be a positive integer, got {multiple!r}.")
    if not (isinstance(ratio, int | float) and math.isfinite(ratio) and ratio > 0):
        raise DecompositionError(f"ratio must be a positive number, got {ratio!r}.")
    if strategy not in STRATEGIES:
        raise DecompositionError(
            f"allocation strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}."
        )
    if error not in ("relative", "absolute"):
        raise DecompositionError(f"error scale {error!r} is unknown; use 'relative' or 'absolute'.")
    if not (isinstance(min_fraction, int | float) and 0.0 <= min_fraction <= 1.0):
        raise DecompositionError(f"min_fraction must be in [0, 1], got {min_fraction!r}.")
    layers = _layers(spectra, budget, multiple, float(min_fraction), error)
    original = sum(int(layer.costs[-1]) for layer in layers)
    target = ratio * original
    floor = sum(int(layer.costs[0]) for layer in layers)
    if floor > target and min_fraction > 0:
        # The floor is a preference: lower it (bisection) until the budget becomes feasible.
        low, high = 0.0, float(min_fraction)
        for _ in range(30):
            mid = 0.5 * (low + high)
            trial = _layers(spectra, budget, multiple, mid, error)
            if sum(int(layer.costs[0]) for layer in trial) <= target:
                low = mid
            else:
                high = mid
        logger.info(
            "min_fraction %.3g infeasible at ratio %s; lowered to %.3g", min_fraction, ratio, low
        )
        layers = _layers(spectra, budget, multiple, low, error)
        floor = sum(int(layer.costs[0]) for layer in layers)
    if floor > target:
        smallest = math.ceil(floor / original * 1e4) / 1e4 if original else 1.0
        raise DecompositionError(
            f"ratio {ratio} is infeasible: with the lowest allowed rank on every factorizable "
            f"weight the {budget} budget cannot go below a ratio of {smallest}."
        )
    if strategy == "optimal" and not _knapsack(layers, target):
        strategy = "lagrangian"
    if strategy == "lagrangian":
        _lagrangian(layers, target)
        _fill_back(layers, target, steps_only=False)
    elif strategy == "greedy":
        _greedy(layers, target)
        _fill_back(layers, target, steps_only=True)
    elif strategy == "uniform":
        _uniform(layers, target, float(ratio), multiple)
    total = sum(layer.cost for layer in layers)
    assert total <= target, "allocation exceeded its budget"
    logger.info(
        "allocated ranks (%s, %s error) for %d weights: %s %d -> %d (%.4f of %.4f allowed)",
        strategy,
        error,
        len(layers),
        budget,
        original,
        total,
        total / original if original else 1.0,
        ratio,
    )
    return {layer.name: layer.ranks[layer.choice] for layer in layers}


@dataclass(frozen=True, eq=False)
class WeightOptions:
    """One weight's choices for ``allocate_options``: costs ascending, the last one dense.

    ``errors[k]`` is the error of option ``k`` on the allocation's scale (for example the
    relative squared error); the dense option (last) costs ``costs[-1]`` and has error 0.
    """

    name: str
    costs: np.ndarray  # int, strictly ascending
    errors: np.ndarray  # float, errors[-1] == 0


def allocate_options(
    weights: Sequence[WeightOptions],
    *,
    ratio: float,
    strategy: Literal["optimal", "lagrangian"] = "optimal",
) -> dict[str, int]:
    """Index of one option per weight minimising the summed error with cost ≤ ``ratio`` of dense.

    The multiple-choice knapsack of ``allocate_ranks`` over arbitrary options (Kronecker shapes
    and term counts, for example): ``optimal`` is exact (dynamic programming, falling back to
    ``lagrangian`` when the table would be too large), ``lagrangian`` walks the lower convex
    hulls and fills back the slack. Raises ``DecompositionError`` when even the cheapest option
    of every weight exceeds the budget.
    """
    if not (isinstance(ratio, int | float) and math.isfinite(ratio) and ratio > 0):
        raise DecompositionError(f"ratio must be a positive number, got {ratio!r}.")
    if strategy not in ("optimal", "lagrangian"):
        raise DecompositionError(
            f"option allocation strategy {strategy!r} is unknown; use 'optimal' or 'lagrangian'."
        )
    layers: list[_Layer] = []
    for index, weight in enumerate(weights):
        costs = np.asarray(weight.costs, dtype=np.int64)
        errors = np.asarray(weight.errors, dtype=np.float64)
        if costs.ndim != 1 or costs.shape != errors.shape or costs.size == 0:
            raise DecompositionError(
                f"weight {weight.name!r} needs equally long, non-empty 1-D costs and errors."
            )
        if (np.diff(costs) <= 0).any() or costs[0] < 0:
            raise DecompositionError(
                f"weight {weight.name!r}: option costs must be non-negative and strictly ascending."
            )
        if not np.isfinite(errors).all() or errors[-1] != 0.0:
            raise DecompositionError(
                f"weight {weight.name!r}: errors must be finite and the last (dense) option's 0."
            )
        options: list[int | None] = list(range(costs.size))
        layers.append(_Layer(index, weight.name, 1, options, costs, errors))
    original = sum(int(layer.costs[-1]) for layer in layers)
    target = ratio * original
    floor = sum(int(layer.costs[0]) for layer in layers)
    if floor > target:
        smallest = math.ceil(floor / original * 1e4) / 1e4 if original else 1.0
        raise DecompositionError(
            f"ratio {ratio} is infeasible: the cheapest options cannot go below a ratio of "
            f"{smallest}."
        )
    if strategy == "lagrangian" or not _knapsack(layers, target):
        _lagrangian(layers, target)
        _fill_back(layers, target, steps_only=False)
    assert sum(layer.cost for layer in layers) <= target, "allocation exceeded its budget"
    return {layer.name: layer.choice for layer in layers}


def _knapsack(layers: list[_Layer], target: float) -> bool:
    """Exact multiple-choice knapsack over costs in gcd units; False when the table is too big."""
    unit = reduce(math.gcd, (int(c) for layer in layers for c in layer.costs), 0)
    if unit == 0:  # nothing costs anything: keep everything dense
        for layer in layers:
            layer.choice = layer.dense
        return True
    cap = math.floor(target / unit)
    while cap > 0 and cap * unit > target:
        cap -= 1
    if len(layers) * (cap + 1) > _DP_MAX_CELLS:
        logger.info("knapsack table %d x %d too large; using the Lagrangian", len(layers), cap + 1)
        return False
    best = np.zeros(cap + 1)  # best[c]: least error of the layers so far with cost ≤ c·unit
    choices = np.zeros((len(layers), cap + 1), dtype=np.int32)
    for row, layer in enumerate(layers):
        new = np.full(cap + 1, np.inf)
        for k, (cost, err) in enumerate(zip(layer.costs // unit, layer.errors, strict=True)):
            c = int(cost)
            if c > cap:
                break
            candidate = best[: cap + 1 - c] + err
            better = candidate < new[c:]
            new[c:][better] = candidate[better]
            choices[row, c:][better] = k
        best = new
    c = cap
    for row in range(len(layers) - 1, -1, -1):
        layer = layers[row]
        layer.choice = int(choices[row, c])
        c -= int(layer.costs[layer.choice] // unit)
    return True


def _lower_hull(costs: np.ndarray, errors: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the points (cost, error), cheapest first."""
    hull: list[int] = []
    for k in range(costs.size):
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            cross = float(costs[a] - costs[o]) * float(errors[k] - errors[o]) - float(
                errors[a] - errors[o]
            ) * float(costs[k] - costs[o])
            if cross > 0:
                break
            hull.pop()
        hull.append(k)
    return hull


def _lagrangian(layers: list[_Layer], target: float) -> None:
    """Sweep λ up from 0: walk every layer's lower hull from dense, cheapest error per unit first.

    Stops at the first point within the budget, which minimises ``Σ err + λ·Σ cost`` for the
    last λ and so has the least error among all allocations of its cost or less.
    """
    hulls = [_lower_hull(layer.costs, layer.errors) for layer in layers]
    position = [len(h) - 1 for h in hulls]
    heap: list[tuple[float, int]] = []

    def push(row: int) -> None:
        pos = position[row]
        if pos > 0:
            layer, hull = layers[row], hulls[row]
            a, b = hull[pos], hull[pos - 1]
            slope = (layer.errors[b] - layer.errors[a]) / float(layer.costs[a] - layer.costs[b])
            heapq.heappush(heap, (float(slope), row))

    for row, layer in enumerate(layers):
        layer.choice = layer.dense
        push(row)
    total = sum(layer.cost for layer in layers)
    while total > target and heap:
        _, row = heapq.heappop(heap)
        layer = layers[row]
        position[row] -= 1
        new = hulls[row][position[row]]
        total -= layer.cost - int(layer.costs[new])
        layer.choice = new
        push(row)


def _greedy(layers: list[_Layer], target: float) -> None:
    """The earlier allocation: from dense, one step of ``multiple`` at a time, cheapest first."""
    heap: list[tuple[float, int]] = []

    def push(layer: _Layer) -> None:
        k = layer.choice
        if k > 0:
            saved = float(layer.costs[k] - layer.costs[k - 1])
            heapq.heappush(heap, ((layer.errors[k - 1] - layer.errors[k]) / saved, layer.index))

    for layer in layers:
        layer.choice = layer.dense
        push(layer)
    by_index = {layer.index: layer for layer in layers}
    total = sum(layer.cost for layer in layers)
    while total > target and heap:
        _, index = heapq.heappop(heap)
        layer = by_index[index]
        total -= layer.cost - int(layer.costs[layer.choice - 1])
        layer.choice -= 1
        push(layer)


def _fill_back(layers: list[_Layer], target: float, *, steps_only: bool) -> None:
    """Spend the slack where it removes the most error per unit, staying within the target.

    ``steps_only`` allows only one step of ``multiple`` up and never back to dense (the
    earlier greedy); otherwise any more expensive option, dense included.
    """
    total = sum(layer.cost for layer in layers)
    while True:
        best: tuple[float, int, int] | None = None
        for row, layer in enumerate(layers):
            k = layer.choice
            if steps_only:
                last = min(k + 1, layer.dense - 1) if k < layer.dense else k
                options = range(k + 1, last + 1)
            else:
                options = range(k + 1, layer.dense + 1)
            for j in options:
                extra = int(layer.costs[j]) - layer.cost
                if total + extra > target:
                    break
                gain = (layer.errors[k] - layer.errors[j]) / extra
                if gain > 0 and (best is None or gain > best[0]):
                    best = (float(gain), row, j)
        if best is None:
            return
        layer = layers[best[1]]
        total += int(layer.costs[best[2]]) - layer.cost
        layer.choice = best[2]


def _uniform(layers: list[_Layer], target: float, ratio: float, multiple: int) -> None:
    """The same fraction ``f`` of every weight's dense cost, for the largest ``f`` that fits."""

    def assign(fraction: float) -> int:
        total = 0
        for layer in layers:
            if fraction >= 1.0 or layer.dense == 0:
                layer.choice = layer.dense
            else:
                dense_cost = int(layer.costs[-1])
                rank = int(fraction * dense_cost / layer.unit) // multiple * multiple
                fits = [k for k in range(layer.dense) if layer.ranks[k] <= rank]  # type: ignore[operator]
                layer.choice = fits[-1] if fits else 0
            total += layer.cost
        return total

    if assign(ratio) <= target:
        return
    low, high = 0.0, ratio
    for _ in range(60):
        mid = 0.5 * (low + high)
        if assign(mid) <= target:
            low = mid
        else:
            high = mid
    assign(low)
