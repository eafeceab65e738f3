"""The quality table's verdicts: kept-parameter ratio, method ordering, best point under a target."""

from __future__ import annotations

import math

import pytest

from factorlm.bench.quality import best_under, kept_linear_ratio, method_ordering


def test_kept_ratio_counts_weights_left_dense() -> None:
    # 10,616,832 linear params; 13 weights (3,244,032) factorized to 586,752: 75 % kept overall.
    ratio = kept_linear_ratio(10_616_832, 3_244_032, 586_752)
    assert ratio == pytest.approx((10_616_832 - 3_244_032 + 586_752) / 10_616_832, rel=1e-15)
    assert kept_linear_ratio(100, 0, 0) == 1.0
    assert kept_linear_ratio(100, 100, 25) == 0.25


@pytest.mark.parametrize(("linear", "before", "after"), [(0, 0, 0), (10, 11, 1), (10, 5, -1)])
def test_kept_ratio_rejects_impossible_counts(linear: int, before: int, after: int) -> None:
    with pytest.raises(ValueError):
        kept_linear_ratio(linear, before, after)


def test_ordering_published_shape_and_its_violations() -> None:
    good = method_ordering({"svd": 0.5, "whiten": 0.9, "kron": 0.7}, 0.75, higher_is_better=True)
    assert good.ranked == ("whiten", "kron", "svd")
    assert good.svd_worst and good.data_aware_best
    # Perplexity: lower is better; a collapsed (NaN) method ranks last, ties keep input order.
    ppl = method_ordering(
        {"svd": 30.0, "asvd": 25.0, "kron": math.nan, "losparse": 30.0}, 0.8, higher_is_better=False
    )
    assert ppl.ranked == ("asvd", "svd", "losparse", "kron")
    assert not ppl.svd_worst and ppl.data_aware_best
    assert ppl.to_dict()["ranked"] == ["asvd", "svd", "losparse", "kron"]


def test_best_under_constraint() -> None:
    points = [
        {"name": "e", "speed": math.nan, "drop": 0.0},
        {"name": "a", "speed": 1.2, "drop": 0.1},
        {"name": "b", "speed": 1.6, "drop": 2.5},
        {"name": "c", "speed": 1.9, "drop": 4.0},
        {"name": "d", "speed": 1.5, "drop": 0.9},
    ]
    fast = best_under(
        points, objective="drop", constraint="speed", limit=1.5, at_least=True, maximize=False
    )
    assert fast is not None and fast["name"] == "d"  # 1.5 counts as reaching 1.5
    good = best_under(
        points, objective="speed", constraint="drop", limit=1.0, at_least=False, maximize=True
    )
    assert good is not None and good["name"] == "d"  # "e" has no measured speed: NaN objective
    assert (
        best_under(
            points, objective="drop", constraint="speed", limit=3.0, at_least=True, maximize=False
        )
        is None
    )


def test_best_under_counts_a_limit_reached_through_float_rounding() -> None:
    points = [{"drop": 73.9 - 72.9, "speed": 1.74}, {"drop": 1.2, "speed": 2.0}]
    good = best_under(
        points, objective="speed", constraint="drop", limit=1.0, at_least=False, maximize=True
    )
    assert good is not None and good["speed"] == 1.74
