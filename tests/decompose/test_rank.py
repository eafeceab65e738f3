"""Rank selection: break-even, energy, rounding and the global budgeted allocation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from factorlm.decompose import (
    WeightOptions,
    WeightSpectrum,
    allocate_options,
    allocate_ranks,
    break_even_rank,
    rank_for_energy,
    round_rank,
)
from factorlm.decompose.rank import _lagrangian, _layers, allocation_cost, allocation_error


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
    ranks = allocate_ranks([flat, steep], ratio=0.5, min_fraction=0.0)
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
    got = error(
        allocate_ranks(spectra, ratio=0.5, strategy="greedy", error="absolute", min_fraction=0.0)
    )
    # Greedy with convex per-weight error curves is optimal up to the last step's granularity.
    assert got <= best * 1.05 + 1e-12
    exact = allocate_ranks(spectra, ratio=0.5, error="absolute", min_fraction=0.0)
    assert error(exact) == pytest.approx(best)


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


def _options(spectra: list[WeightSpectrum], min_fraction: float = 0.0) -> list[list[int | None]]:
    out: list[list[int | None]] = []
    for spec in spectra:
        even = break_even_rank(*spec.shape)
        low = round_rank(max(1, int(np.ceil(min_fraction * even))), 8)
        out.append([None, *range(low, even + 1, 8)])
    return out


def _brute_force(
    spectra: list[WeightSpectrum], budget: float, scale: str, min_fraction: float = 0.0
) -> float:
    """Least objective over every rank combination whose cost fits ``budget``."""
    names = [s.name for s in spectra]
    best = np.inf
    for combo in itertools.product(*_options(spectra, min_fraction)):
        ranks = dict(zip(names, combo, strict=True))
        if allocation_cost(spectra, ranks) <= budget:
            best = min(best, allocation_error(spectra, ranks, scale))  # type: ignore[arg-type]
    return float(best)


def _non_convex(seed: int) -> list[WeightSpectrum]:
    """Three weights of very different energy, with plateaus that make the error curve kink."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (m, n) in enumerate([(64, 64), (64, 160), (96, 48)]):
        s = rng.uniform(0.2, 3.0) * (np.arange(min(m, n)) + 1.0) ** -rng.uniform(0.0, 1.5)
        s[: rng.integers(1, 12)] *= rng.uniform(1.0, 6.0)  # a few dominant directions
        out.append(WeightSpectrum(f"w{i}", (m, n), s * 10.0 ** rng.uniform(-3, 3)))
    return out


@pytest.mark.parametrize("floor", [0.0, 0.5])
@pytest.mark.parametrize("scale", ["relative", "absolute"])
@pytest.mark.parametrize("ratio", [0.85, 0.6, 0.45, 0.3])
@pytest.mark.parametrize("seed", range(4))
def test_optimal_allocation_equals_brute_force(
    floor: float, scale: str, ratio: float, seed: int
) -> None:
    spectra = _non_convex(seed)
    target = ratio * allocation_cost(spectra, {})
    if (
        floor
        and sum(
            min(o for o in opts if o is not None) * sum(s.shape)
            for opts, s in zip(_options(spectra, floor), spectra, strict=True)
        )
        > target
    ):
        pytest.skip("the floor is infeasible at this ratio (it would be lowered)")
    ranks = allocate_ranks(spectra, ratio=ratio, error=scale, min_fraction=floor)  # type: ignore[arg-type]
    assert allocation_cost(spectra, ranks) <= target
    got = allocation_error(spectra, ranks, scale)  # type: ignore[arg-type]
    best = _brute_force(spectra, target, scale, floor)
    assert got == pytest.approx(best, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("ratio", [0.85, 0.6, 0.45, 0.3])
@pytest.mark.parametrize("seed", range(4))
def test_lagrangian_hull_point_is_optimal_for_its_own_cost(ratio: float, seed: int) -> None:
    """Everett: the point where the λ sweep stops beats every allocation of its cost or less."""
    spectra = _non_convex(seed)
    target = ratio * allocation_cost(spectra, {})
    layers = _layers(spectra, "params", 8)  # no floor
    _lagrangian(layers, target)
    hull = {layer.name: layer.ranks[layer.choice] for layer in layers}
    hull_cost = allocation_cost(spectra, hull)
    assert hull_cost <= target
    hull_error = allocation_error(spectra, hull)
    assert hull_error <= _brute_force(spectra, hull_cost, "relative") * (1 + 1e-12)
    # The fill-back only lowers the error and stays within the budget.
    ranks = allocate_ranks(spectra, ratio=ratio, strategy="lagrangian", min_fraction=0.0)
    assert allocation_cost(spectra, ranks) <= target
    assert allocation_error(spectra, ranks) <= hull_error
    optimum = allocation_error(spectra, allocate_ranks(spectra, ratio=ratio, min_fraction=0.0))
    assert optimum <= allocation_error(spectra, ranks) * (1 + 1e-12)


def test_optimal_opens_every_weight_instead_of_crushing_one() -> None:
    """The earlier greedy's failure: opening a weight (dense -> 32 of 66x66) saves 132 parameters
    for a large error, so it crushed the first weight it opened to rank 8."""
    s = 1.0 / (np.arange(66) + 1.0)
    spectra = [WeightSpectrum(name, (66, 66), s) for name in "abc"]
    greedy = allocate_ranks(
        spectra, ratio=0.6, strategy="greedy", error="absolute", min_fraction=0.0
    )
    assert greedy == {"a": 8, "b": 16, "c": None}
    for strategy in ("optimal", "lagrangian"):
        best = allocate_ranks(spectra, ratio=0.6, strategy=strategy, min_fraction=0.0)  # type: ignore[arg-type]
        assert None not in best.values() and min(best.values()) >= 16  # type: ignore[type-var]
        assert allocation_error(spectra, best) < 0.8 * allocation_error(spectra, greedy)


def test_relative_error_does_not_favour_small_activations() -> None:
    """Two weights with identical shape of spectrum but 1000x different scale get equal ranks."""
    s = (np.arange(64) + 1.0) ** -0.5
    spectra = [WeightSpectrum("loud", (64, 64), s * 1e3), WeightSpectrum("quiet", (64, 64), s)]
    relative = allocate_ranks(spectra, ratio=0.5, min_fraction=0.0)
    assert relative["loud"] == relative["quiet"]
    absolute = allocate_ranks(spectra, ratio=0.5, error="absolute", min_fraction=0.0)
    assert absolute["quiet"] == 8  # in absolute terms the quiet weight looks free to crush


@pytest.mark.parametrize("strategy", ["optimal", "lagrangian", "greedy", "uniform"])
def test_min_fraction_floors_every_factorized_rank(strategy: str) -> None:
    spectra = _spectra(7)
    ranks = allocate_ranks(spectra, ratio=0.8, strategy=strategy, min_fraction=0.3)  # type: ignore[arg-type]
    assert allocation_cost(spectra, ranks) <= 0.8 * allocation_cost(spectra, {})
    for spec in spectra:
        r = ranks[spec.name]
        assert r is None or r >= 0.3 * break_even_rank(*spec.shape)


def test_uniform_keeps_the_same_fraction_everywhere() -> None:
    spectra = [WeightSpectrum(f"w{i}", (64, 256), np.ones(64)) for i in range(3)]
    ranks = allocate_ranks(spectra, ratio=0.5, strategy="uniform")
    assert set(ranks.values()) == {24}  # 0.5 · 64·256 / 320 = 25.6, rounded down to 24
    assert allocation_cost(spectra, ranks) <= 0.5 * allocation_cost(spectra, {})


def test_optimal_falls_back_to_the_lagrangian_on_a_huge_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import factorlm.decompose.rank as rank_module

    spectra = _non_convex(1)
    monkeypatch.setattr(rank_module, "_DP_MAX_CELLS", 1)
    assert allocate_ranks(spectra, ratio=0.5) == allocate_ranks(
        spectra, ratio=0.5, strategy="lagrangian"
    )
    assert allocate_ranks(spectra, ratio=0.5, min_fraction=0.0) == allocate_ranks(
        spectra, ratio=0.5, strategy="lagrangian", min_fraction=0.0
    )


def test_an_infeasible_floor_is_lowered_not_refused() -> None:
    spectra = _spectra(8)
    ranks = allocate_ranks(spectra, ratio=0.2, min_fraction=0.9)
    assert allocation_cost(spectra, ranks) <= 0.2 * allocation_cost(spectra, {})
    strict = allocate_ranks(spectra, ratio=0.9, min_fraction=0.5)
    for spec in spectra:
        r = strict[spec.name]
        assert r is None or r >= 0.5 * break_even_rank(*spec.shape)


def _random_options(rng: np.random.Generator, count: int) -> list[WeightOptions]:
    weights = []
    for w in range(count):
        k = int(rng.integers(1, 5))
        dense = int(rng.integers(40, 100))
        costs = np.sort(rng.choice(np.arange(1, dense), size=k, replace=False))
        errors = np.sort(rng.uniform(0.0, 1.0, k))[::-1]  # not convex: any decreasing errors
        weights.append(WeightOptions(f"w{w}", np.append(costs, dense), np.append(errors, 0.0)))
    return weights


@pytest.mark.parametrize("strategy", ["optimal", "lagrangian"])
@pytest.mark.parametrize("seed", range(6))
def test_option_allocation_against_brute_force(strategy: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights = _random_options(rng, 4)
    ratio = float(rng.uniform(0.3, 0.9))
    target = ratio * sum(int(w.costs[-1]) for w in weights)
    best = min(
        (
            sum(float(w.errors[k]) for w, k in zip(weights, combo, strict=True))
            for combo in itertools.product(*(range(w.costs.size) for w in weights))
            if sum(int(w.costs[k]) for w, k in zip(weights, combo, strict=True)) <= target
        ),
        default=None,
    )
    if best is None:
        with pytest.raises(ValueError, match="infeasible"):
            allocate_options(weights, ratio=ratio, strategy=strategy)  # type: ignore[arg-type]
        return
    picked = allocate_options(weights, ratio=ratio, strategy=strategy)  # type: ignore[arg-type]
    cost = sum(int(w.costs[picked[w.name]]) for w in weights)
    error = sum(float(w.errors[picked[w.name]]) for w in weights)
    assert cost <= target
    if strategy == "optimal":
        assert error == pytest.approx(best, abs=1e-12)
    else:  # a hull walk plus fill-back: feasible, and never worse than all-cheapest
        assert error <= sum(float(w.errors[0]) for w in weights) + 1e-12


@pytest.mark.parametrize(
    ("costs", "errors", "message"),
    [([3, 2, 5], [0.5, 0.4, 0.0], "ascending"), ([1, 5], [0.5, 0.1], "dense"), ([], [], "empty")],
)
def test_bad_option_input(costs: list[int], errors: list[float], message: str) -> None:
    weights = [WeightOptions("w", np.asarray(costs, dtype=np.int64), np.asarray(errors))]
    with pytest.raises(ValueError, match=message):
        allocate_options(weights, ratio=0.5)
