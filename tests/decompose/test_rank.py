"""Rank selection: break-even, energy, rounding and the global budgeted allocation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from factorlm.decompose import (
    WeightSpectrum,
    allocate_ranks,
    break_even_rank,
    rank_for_energy,
    round_rank,
)
from factorlm.decompose.rank import allocation_cost


@pytest.mark.parametrize(("m", "n"), [(1, 1), (1, 9), (2, 2), (3, 5), (768, 768), (768, 3072)])
def test_break_even_rank_is_the_largest_profitable_rank(m: int, n: int) -> None:
    r = break_even_rank(m, n)
    assert r * (m + n) < m * n or r == 0
    assert (r + 1) * (m + n) >= m * n
    assert break_even_rank(768, 768) == 383


def test_rank_for_energy() -> None:
    s = np.array([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 9 / 14 + 1e-6) == 2
    assert rank_for_energy(s, 13 / 14) == 2
    assert rank_for_energy(s, 1.0) == 3
    assert rank_for_energy(np.zeros(4), 0.9) == 1
    with pytest.raises(ValueError, match="energy"):
        rank_for_energy(s, 0.0)


def test_round_rank() -> None:
    assert [round_rank(r, 8) for r in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]
    assert round_rank(5, 1) == 5
    with pytest.raises(ValueError, match="multiple"):
        round_rank(5, 0)


def _spectra(seed: int, count: int = 6) -> list[WeightSpectrum]:
    rng = np.random.default_rng(seed)
    shapes = [(64, 64), (64, 256), (256, 64), (48, 40), (5, 300), (128, 96)]
    out = []
    for i in range(count):
        m, n = shapes[i % len(shapes)]
        decay = rng.uniform(0.1, 2.0)
        s = rng.uniform(0.5, 2.0) * (np.arange(min(m, n)) + 1.0) ** -decay
        out.append(WeightSpectrum(f"w{i}", (m, n), s))
    return out


@pytest.mark.parametrize("budget", ["params", "flops"])
@pytest.mark.parametrize("ratio", [0.9, 0.6, 0.45, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocation_respects_the_budget_exactly(budget: str, ratio: float, seed: int) -> None:
    spectra = _spectra(seed)
    ranks = allocate_ranks(spectra, ratio=ratio, budget=budget)  # type: ignore[arg-type]
    assert set(ranks) == {s.name for s in spectra}
    original = allocation_cost(spectra, {}, budget)  # type: ignore[arg-type]
    assert allocation_cost(spectra, ranks, budget) <= ratio * original  # type: ignore[arg-type]
    for spec in spectra:
        r = ranks[spec.name]
        if r is not None:
            assert r % 8 == 0 and 8 <= r <= break_even_rank(*spec.shape)
    assert ranks["w4"] is None  # 5 x 300: break-even rank 4 < 8, never factorized
    assert allocate_ranks(spectra, ratio=ratio, budget=budget) == ranks  # type: ignore[arg-type]


def test_budget_is_spent_tightly() -> None:
    spectra = _spectra(3)
    ranks = allocate_ranks(spectra, ratio=0.5)
    original = allocation_cost(spectra, {})
    slack = 0.5 * original - allocation_cost(spectra, ranks)
    # No factorized weight could take one more step of 8 within the remaining budget.
    for spec in spectra:
        r = ranks[spec.name]
        if r is not None and r + 8 <= break_even_rank(*spec.shape):
            assert 8 * sum(spec.shape) > slack


def test_allocation_spends_where_error_is_cheapest() -> None:
    flat = WeightSpectrum("flat", (64, 64), np.ones(64))
    steep = WeightSpectrum("steep", (64, 64), 0.5 ** np.arange(64))
    ranks = allocate_ranks([flat, steep], ratio=0.5)
    assert ranks["steep"] == 8
    assert ranks["flat"] is not None and ranks["flat"] > 8


def test_allocation_matches_brute_force_on_a_small_case() -> None:
    spectra = _spectra(4, count=3)
    target = 0.5 * allocation_cost(spectra, {})
    options = []
    for spec in spectra:
        even = break_even_rank(*spec.shape)
        options.append([None, *range(8, even + 1, 8)])

    def error(ranks: dict[str, int | None]) -> float:
        total = 0.0
        for spec in spectra:
            r = ranks[spec.name]
            total += 0.0 if r is None else float(np.sum(spec.singular_values[r:] ** 2))
        return total

    best = min(
        error(dict(zip([s.name for s in spectra], combo, strict=True)))
        for combo in itertools.product(*options)
        if allocation_cost(spectra, dict(zip([s.name for s in spectra], combo, strict=True)))
        <= target
    )
    got = error(allocate_ranks(spectra, ratio=0.5))
    # Greedy with convex per-weight error curves is optimal up to the last step's granularity.
    assert got <= best * 1.05 + 1e-12


def test_infeasible_ratio_names_the_smallest_feasible_one() -> None:
    spectra = _spectra(5)
    with pytest.raises(ValueError, match=r"smallest|cannot go below a ratio of") as info:
        allocate_ranks(spectra, ratio=0.01)
    smallest = float(str(info.value).rstrip(".").split()[-1])
    ranks = allocate_ranks(spectra, ratio=smallest)
    assert all(r in (None, 8) for r in ranks.values())


def test_ratio_one_keeps_everything_dense() -> None:
    assert set(allocate_ranks(_spectra(6), ratio=1.0).values()) == {None}


def test_flops_budget_uses_tokens_per_call() -> None:
    s = np.ones(64)
    lookup = WeightSpectrum("embedding", (64, 64), s, tokens_per_call=0)
    linear = WeightSpectrum("linear", (64, 64), s)
    ranks = allocate_ranks([lookup, linear], ratio=0.5, budget="flops")
    assert ranks["embedding"] is None and ranks["linear"] is not None


@pytest.mark.parametrize(
    ("spectra", "kwargs", "message"),
    [
        ([WeightSpectrum("a", (4, 4), np.ones(4))] * 2, {}, "appears twice"),
        ([WeightSpectrum("a", (4, 4), np.ones(5))], {}, "at most 4"),
        ([WeightSpectrum("a", (4, 4), -np.ones(4))], {}, "non-negative"),
        ([WeightSpectrum("a", (4, 4), np.ones(4))], {"budget": "bytes"}, "budget"),
        ([WeightSpectrum("a", (4, 4), np.ones(4))], {"ratio": 0.0}, "ratio"),
        ([WeightSpectrum("a", (4, 4), np.ones(4))], {"multiple": 0}, "multiple"),
    ],
)
def test_bad_allocation_input(
    spectra: list[WeightSpectrum], kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"ratio": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        allocate_ranks(spectra, **args)  # type: ignore[arg-type]
