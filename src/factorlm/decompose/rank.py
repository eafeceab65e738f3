"""Rank selection: break-even, energy, alignment, and a global allocation under a budget.

Costs (per weight ``(m, n)``): dense ``m·n`` parameters and ``2·m·n`` FLOPs per token; rank r
``r·(m + n)`` and ``2·r·(m + n)``. Factorizing pays only below the break-even rank
``r < m·n / (m + n)``.

``allocate_ranks`` is a global greedy over all weights. Each weight starts dense; its moves are
"dense → largest profitable multiple of ``multiple``" and then "rank r → r − multiple". A move
costs added error ``Σ s_i²`` over the dropped singular values (the exact Frobenius error of the
truncation, data-aware when the spectrum is) and saves parameters (or FLOPs). Moves are taken in
order of smallest added error per saved unit until the total fits ``ratio · original``; because
the per-weight error increments grow as the rank shrinks, each weight's moves come out in order.
The last move may undershoot the target, so a fill-back pass then returns rank (one step of
``multiple``) where it removes the most error per unit, while the total stays within the target.
Ties are broken by the weights' order, so the result is deterministic.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from factorlm.decompose._validate import DecompositionError

__all__ = [
    "Budget",
    "WeightSpectrum",
    "allocate_ranks",
    "allocation_cost",
    "break_even_rank",
    "rank_for_energy",
    "round_rank",
]

logger = logging.getLogger(__name__)

Budget = Literal["params", "flops"]


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
    """Greedy state of one weight."""

    index: int
    name: str
    m: int
    n: int
    unit: int  # cost of one rank (params: m + n; flops: 2·tpc·(m + n))
    dense_cost: int
    ranks: list[int]  # profitable multiples, ascending; empty = always dense
    tail: np.ndarray  # tail[r] = Σ_{i ≥ r} s_i² for r = 0..len(s)
    rank: int | None = None

    def cost(self, rank: int | None) -> int:
        return self.dense_cost if rank is None else rank * self.unit

    def error(self, rank: int | None) -> float:
        if rank is None:
            return 0.0
        return float(self.tail[min(rank, self.tail.size - 1)])

    def down(self) -> int | None:
        """The next smaller rank, or None when already at the floor or always dense."""
        if not self.ranks:
            return None
        if self.rank is None:
            return self.ranks[-1]
        pos = self.ranks.index(self.rank)
        return self.ranks[pos - 1] if pos > 0 else None

    def up(self) -> int | None:
        """The next larger factorized rank (never back to dense), or None."""
        if self.rank is None:
            return None
        pos = self.ranks.index(self.rank)
        return self.ranks[pos + 1] if pos + 1 < len(self.ranks) else None


def _layers(spectra: Sequence[WeightSpectrum], budget: Budget, multiple: int) -> list[_Layer]:
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
        ranks = list(range(multiple, even + 1, multiple)) if scale > 0 else []
        tail = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])
        layers.append(_Layer(index, spec.name, m, n, scale * (m + n), scale * m * n, ranks, tail))
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


def allocate_ranks(
    spectra: Sequence[WeightSpectrum],
    *,
    ratio: float,
    budget: Budget = "params",
    multiple: int = 8,
) -> dict[str, int | None]:
    """Global greedy ranks so that the cost is at most ``ratio`` of the dense cost.

    Returns ``name -> rank`` (a multiple of ``multiple`` below break-even) or None for weights
    kept dense. Raises ``ValueError`` when ``ratio`` cannot be met, naming the smallest feasible
    ratio.
    """
    if budget not in ("params", "flops"):
        raise DecompositionError(f"budget {budget!r} is unknown; use 'params' or 'flops'.")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise DecompositionError(f"multiple must be a positive integer, got {multiple!r}.")
    if not (isinstance(ratio, int | float) and math.isfinite(ratio) and ratio > 0):
        raise DecompositionError(f"ratio must be a positive number, got {ratio!r}.")
    layers = _layers(spectra, budget, multiple)
    original = sum(layer.dense_cost for layer in layers)
    target = ratio * original
    floor = sum(layer.cost(layer.ranks[0] if layer.ranks else None) for layer in layers)
    if floor > target:
        smallest = math.ceil(floor / original * 1e4) / 1e4 if original else 1.0
        raise DecompositionError(
            f"ratio {ratio} is infeasible: with rank {multiple} on every factorizable weight the "
            f"{budget} budget cannot go below a ratio of {smallest}."
        )
    total = original

    def price(layer: _Layer, new: int | None, old: int | None) -> tuple[float, int]:
        saved = layer.cost(old) - layer.cost(new)
        return (layer.error(new) - layer.error(old)) / saved, layer.index

    heap: list[tuple[float, int]] = []
    for layer in layers:
        nxt = layer.down()
        if nxt is not None:
            heapq.heappush(heap, price(layer, nxt, None))
    while total > target and heap:
        _, index = heapq.heappop(heap)
        layer = layers[index]
        new = layer.down()
        assert new is not None  # only pushed when a move exists
        total -= layer.cost(layer.rank) - layer.cost(new)
        layer.rank = new
        nxt = layer.down()
        if nxt is not None:
            heapq.heappush(heap, price(layer, nxt, layer.rank))
    total = _fill_back(layers, total, target)
    logger.info(
        "allocated ranks for %d weights: %s %d -> %d (%.4f of %.4f allowed)",
        len(layers),
        budget,
        original,
        total,
        total / original if original else 1.0,
        ratio,
    )
    return {layer.name: layer.rank for layer in layers}


def _fill_back(layers: list[_Layer], total: int, target: float) -> int:
    """Return rank where it removes the most error per unit while the total stays ≤ target."""
    while True:
        best: tuple[float, int] | None = None
        for layer in layers:
            up = layer.up()
            if up is None or total + layer.cost(up) - layer.cost(layer.rank) > target:
                continue
            gain = (layer.error(layer.rank) - layer.error(up)) / (
                layer.cost(up) - layer.cost(layer.rank)
            )
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, layer.index)
        if best is None:
            return total
        layer = layers[best[1]]
        up = layer.up()
        assert up is not None
        total += layer.cost(up) - layer.cost(layer.rank)
        layer.rank = up
