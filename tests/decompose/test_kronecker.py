"""Sums of Kronecker products: exact on A ⊗ B, Van Loan optimal, correct counts and shapes."""

from __future__ import annotations

import numpy as np
import pytest

from factorlm.decompose import (
    KroneckerFactors,
    kronecker,
    kronecker_cost,
    kronecker_spectrum,
    propose_kronecker_shapes,
)


def test_exact_on_a_kronecker_product() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((5, 2))
    w = np.kron(a, b)
    kf = kronecker(w, (3, 4), 1)
    assert kf.shape == w.shape == (15, 8)
    np.testing.assert_allclose(kf.reconstruct(), w, atol=1e-12)
    np.testing.assert_allclose(np.kron(kf.a[0], kf.b[0]), w, atol=1e-12)


def test_exact_on_a_sum_of_two_products() -> None:
    rng = np.random.default_rng(1)
    w = sum(np.kron(rng.standard_normal((2, 3)), rng.standard_normal((4, 4))) for _ in range(2))
    np.testing.assert_allclose(kronecker(w, (2, 3), 2).reconstruct(), w, atol=1e-12)


@pytest.mark.parametrize("terms", [1, 2, 4])
def test_van_loan_error_is_the_rearranged_spectrum_tail(terms: int) -> None:
    w = np.random.default_rng(2).standard_normal((12, 10))
    a_shape, b_shape = (3, 2), (4, 5)
    kf = kronecker(w, a_shape, terms)
    # Independent rearrangement: entry by entry, R[(i1, j1), (i2, j2)] = W[i1·4 + i2, j1·5 + j2].
    rearranged = np.empty((6, 20))
    for i1 in range(3):
        for j1 in range(2):
            for i2 in range(4):
                for j2 in range(5):
                    rearranged[i1 * 2 + j1, i2 * 5 + j2] = w[i1 * 4 + i2, j1 * 5 + j2]
    s = np.linalg.svd(rearranged, compute_uv=False)
    err = np.linalg.norm(w - kf.reconstruct())
    np.testing.assert_allclose(err, np.sqrt(np.sum(s[terms:] ** 2)), rtol=1e-10)
    assert kf.a.shape == (terms, *a_shape) and kf.b.shape == (terms, *b_shape)


def test_counts_and_matvec_cost() -> None:
    kf = KroneckerFactors(np.zeros((2, 3, 4)), np.zeros((2, 5, 6)))
    assert kf.shape == (15, 24)
    assert kf.num_params == 2 * (12 + 30)
    # Aᵀ X B for X (3, 5): X·B = 3·5·6 then Aᵀ· = 4·3·6 → 162; the other order 4·3·5 + 4·5·6 = 180.
    assert kf.flops_per_token == 2 * 2 * 162
    x = np.random.default_rng(3).standard_normal(15)
    a, b = (
        np.random.default_rng(4).standard_normal((3, 4)),
        np.random.default_rng(5).standard_normal((5, 6)),
    )
    np.testing.assert_allclose(x @ np.kron(a, b), (a.T @ x.reshape(3, 5) @ b).ravel(), atol=1e-12)


def test_dtype_is_kept() -> None:
    w = np.random.default_rng(6).standard_normal((8, 6)).astype(np.float16)
    kf = kronecker(w, (2, 3), 2)
    assert kf.a.dtype == kf.b.dtype == kf.reconstruct().dtype == np.float16


@pytest.mark.parametrize(
    ("a_shape", "terms", "message"),
    [((3, 2), 1, "does not divide"), ((0, 2), 1, "does not divide"), ((2, 3), 7, "terms 7")],
)
def test_bad_arguments(a_shape: tuple[int, int], terms: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kronecker(np.ones((8, 6)), a_shape, terms)


def test_proposed_shapes_divide_and_are_ordered() -> None:
    proposals = propose_kronecker_shapes(768, 3072)
    assert proposals
    costs = [a[0] * a[1] + b[0] * b[1] for a, b in proposals]
    assert costs == sorted(costs)
    for (a_in, a_out), (b_in, b_out) in proposals:
        assert a_in * b_in == 768 and a_out * b_out == 3072
        assert min(a_in, a_out, b_in, b_out) >= 2
    assert proposals[0] == ((24, 64), (32, 48))
    assert propose_kronecker_shapes(1, 1) == []
    assert all(a[0] * a[1] > 1 and b[0] * b[1] > 1 for a, b in propose_kronecker_shapes(7, 3))


@pytest.mark.parametrize(("a_shape", "terms"), [((4, 3), 1), ((4, 3), 3), ((2, 6), 2), ((8, 2), 4)])
def test_spectrum_tail_is_the_kronecker_error(a_shape: tuple[int, int], terms: int) -> None:
    w = np.random.default_rng(11).standard_normal((16, 12))
    s = kronecker_spectrum(w, a_shape)
    assert np.all(np.diff(s) <= 1e-12)
    error = np.linalg.norm(w - kronecker(w, a_shape, terms).reconstruct())
    assert error**2 == pytest.approx(float(np.sum(s[terms:] ** 2)), rel=1e-9, abs=1e-9)
    assert float(np.sum(s**2)) == pytest.approx(float(np.sum(w**2)), rel=1e-12)


def test_cost_matches_the_rewrite_and_flops_never_below_params() -> None:
    # (Aᵀ X) B for X: (a_in, b_in): a_out·a_in·b_in + a_out·b_in·b_out multiply-adds per term.
    assert kronecker_cost((6, 4), (5, 3), 2) == (2 * (24 + 15), 2 * 2 * (4 * 6 * 5 + 4 * 5 * 3))
    for (a_in, a_out), (b_in, b_out) in propose_kronecker_shapes(384, 1536, limit=50):
        params, flops = kronecker_cost((a_in, a_out), (b_in, b_out), 1)
        assert flops / (2 * 384 * 1536) >= params / (384 * 1536)  # as fractions of dense
        # FLOPs relative to dense: terms · (1/a_in + 1/b_out).
        assert flops / (2 * 384 * 1536) == pytest.approx(1 / a_in + 1 / b_out)


def test_shapes_by_flops_start_with_the_fewest_flops_per_parameter() -> None:
    proposals = propose_kronecker_shapes(384, 1536, limit=6, by="flops")
    ratios = [kronecker_cost(a, b, 1)[1] / kronecker_cost(a, b, 1)[0] for a, b in proposals]
    assert ratios == sorted(ratios)
    # FLOPs (2·multiply-adds) exactly 4x the parameters: twice their fraction of dense.
    assert proposals[0] == ((192, 2), (2, 768))
    assert ratios[0] == pytest.approx(4.0)
    everything = propose_kronecker_shapes(384, 1536, limit=10_000)
    assert min(kronecker_cost(a, b, 1)[1] / kronecker_cost(a, b, 1)[0] for a, b in everything) == (
        pytest.approx(4.0)
    )
    with pytest.raises(ValueError, match="by"):
        propose_kronecker_shapes(4, 4, by="time")  # type: ignore[arg-type]
