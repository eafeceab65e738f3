"""Loss-aware whitening with the FULL output-gradient Gram ``H = Σ_t g_t g_tᵀ`` (issue 16).

The objective is ``‖X (W − M) H^{1/2}‖² = tr((W − M)ᵀ XᵀX (W − M) H)``; the closed form
``A⁻¹ [A W L]_r L⁻¹`` (``L Lᵀ = H + δI``) is checked against an optimiser that knows nothing about
SVD, through every entry point, on both sides (in ≤ out and in > out).
"""

from __future__ import annotations

import numpy as np
import pytest

from factorlm.decompose import (
    DecompositionError,
    decompose,
    methods,
    prepare,
    prepared_lowrank,
    spectrum,
)
from factorlm.decompose.methods import MethodInputs

from .conftest import brute_force_lowrank, decaying


def _inputs(tokens: int, m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix, _ = np.linalg.qr(rng.standard_normal((m, m)))
    return (rng.standard_normal((tokens, m)) * np.logspace(-1, 1, m)) @ mix


def _output_gram(tokens: int, n: int, seed: int) -> np.ndarray:
    """``Σ_t g_t g_tᵀ`` of correlated gradients: far from diagonal, uneven scales."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n, n)) * np.logspace(-0.5, 0.5, n)
    g = rng.standard_normal((tokens, n)) @ mix
    return g.T @ g


def _objective(x: np.ndarray, w: np.ndarray, h: np.ndarray):  # type: ignore[no-untyped-def]
    g = x.T @ x

    def objective(mat: np.ndarray) -> tuple[float, np.ndarray]:
        diff = mat - w
        value = float(np.trace(diff.T @ g @ diff @ h))
        return value, 2.0 * g @ diff @ h

    return objective


@pytest.mark.parametrize(("m", "n"), [(6, 4), (4, 6), (5, 5)])
def test_full_output_gram_is_the_two_sided_optimum(m: int, n: int) -> None:
    """Closed form = brute force; every entry point gives the same factors; the spectrum's tail
    is the error; the diagonal of H alone (today's loss-aware statistic) is worse here."""
    rank = 2
    x = _inputs(50, m, 21)
    w = decaying(m, n, 22, decay=0.3)
    h = _output_gram(40, n, 23)
    objective = _objective(x, w, h)
    g = x.T @ x
    closed = decompose(w, "whiten", rank, gram=g, output_gram=h).reconstruct()
    best = brute_force_lowrank(objective, (m, n), rank)
    np.testing.assert_allclose(objective(closed)[0], best, rtol=1e-6)
    for other in (
        decompose(w, "drone", rank, gram=g, output_gram=h, svd_method="exact"),
        prepared_lowrank(w, "whiten", rank, gram=g, output_gram=h),
        prepare(w, "whiten", gram=g, output_gram=h, keep=0).lowrank(w, rank),
        prepare(w, "whiten", gram=g, output_gram=h).lowrank(w, rank),
        prepare(w, "whiten", gram=g, output_gram=h, keep=1).lowrank(w, rank),
    ):
        np.testing.assert_allclose(other.reconstruct(), closed, rtol=1e-6, atol=1e-9)
    tail = spectrum(w, "whiten", gram=g, output_gram=h)[rank:]
    np.testing.assert_allclose(objective(closed)[0], np.sum(tail**2), rtol=1e-6)
    prepared = prepare(w, "whiten", gram=g, output_gram=h, keep=0).singular_values
    np.testing.assert_allclose(prepared, spectrum(w, "whiten", gram=g, output_gram=h), rtol=1e-8)
    diagonal = decompose(w, "whiten", rank, gram=g, output_weight=np.diag(h)).reconstruct()
    assert objective(diagonal)[0] > 1.01 * objective(closed)[0]


def test_a_diagonal_output_gram_is_the_diagonal_weighting() -> None:
    """``H = diag(g)`` reproduces ``output_weight=g`` on both sides and all entry points."""
    rng = np.random.default_rng(24)
    for m, n in [(7, 12), (12, 7)]:
        w = decaying(m, n, 25)
        x = _inputs(60, m, 26)
        weights = rng.uniform(0.05, 3.0, n)
        g = x.T @ x
        want = decompose(w, "whiten", 3, gram=g, output_weight=weights).reconstruct()
        for got in (
            decompose(w, "whiten", 3, gram=g, output_gram=np.diag(weights)),
            prepared_lowrank(w, "whiten", 3, gram=g, output_gram=np.diag(weights)),
        ):
            np.testing.assert_allclose(got.reconstruct(), want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("m", "n"), [(8, 20), (20, 8)])
def test_singular_zero_and_ill_conditioned_output_grams_never_fail(m: int, n: int) -> None:
    """Fewer gradient tokens than outputs (singular H), H = 0 (plain whitening) and a 1e12
    condition number: finite factors, and the damped optimum still beats plain whitening."""
    w = decaying(m, n, 27)
    x = _inputs(80, m, 28)
    g = x.T @ x
    plain = decompose(w, "whiten", 3, gram=g).reconstruct()
    zero = prepared_lowrank(w, "whiten", 3, gram=g, output_gram=np.zeros((n, n)))
    np.testing.assert_allclose(zero.reconstruct(), plain, rtol=1e-8, atol=1e-10)
    singular = _output_gram(3, n, 29)  # rank 3 < n
    assert np.linalg.matrix_rank(singular) == 3
    rng = np.random.default_rng(30)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ill = (q * np.logspace(0, -12, n)) @ q.T
    for h in (singular, ill):
        objective = _objective(x, w, h)
        for got in (
            decompose(w, "whiten", 3, gram=g, output_gram=h),
            prepare(w, "whiten", gram=g, output_gram=h, keep=0).lowrank(w, 3),
        ):
            assert np.isfinite(got.left).all() and np.isfinite(got.right).all()
            assert objective(got.reconstruct())[0] <= objective(plain)[0] * (1 + 1e-9)


def test_right_side_blocks_match_the_whole_matrix() -> None:
    """in > out with H: the blocked ``W L V_r / √s`` equals the explicit-Z factors."""
    m, n = 300, 24
    rng = np.random.default_rng(31)
    w = rng.standard_normal((m, n)) * np.linspace(0.1, 2.0, n)
    x = _inputs(400, m, 32)
    inputs = MethodInputs(gram=x.T @ x, output_gram=_output_gram(50, n, 33))
    s, vectors = methods._eigh_descending(methods._small_gram(w, "whiten", inputs))
    s, vectors = s[:9], vectors[:, :9]
    transform = methods._transform(w, "whiten", inputs)
    want_left = transform.undo_left(transform.matrix @ vectors / np.sqrt(s)[None, :])
    want_right = transform.undo_right(np.sqrt(s)[:, None] * vectors.T)
    for block_values in (None, 5 * n):
        left, right = methods._right_side_factors(w, vectors, s, "whiten", inputs, block_values)
        np.testing.assert_allclose(left, want_left, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(right, want_right, rtol=1e-9, atol=1e-10)


def test_float32_weights_keep_their_dtype() -> None:
    w = decaying(16, 24, 34).astype(np.float32)
    x = _inputs(50, 16, 35)
    h = _output_gram(30, 24, 36)
    got = prepare(w, "whiten", gram=x.T @ x, output_gram=h).lowrank(w, 4)
    want = decompose(w.astype(np.float64), "whiten", 4, gram=x.T @ x, output_gram=h)
    assert got.left.dtype == np.float32 and got.right.dtype == np.float32
    np.testing.assert_allclose(got.reconstruct(), want.reconstruct(), rtol=1e-4, atol=1e-5)


def test_other_methods_ignore_the_output_gram() -> None:
    """Like ``output_weight``: only whiten and drone weight the output side."""
    w = decaying(6, 9, 37)
    h = _output_gram(20, 9, 38)
    np.testing.assert_allclose(spectrum(w, "svd", output_gram=h), spectrum(w, "svd"), rtol=1e-12)


@pytest.mark.parametrize(
    ("h", "match"),
    [
        (np.eye(5), "shape"),
        (np.triu(np.ones((6, 6))), "not symmetric"),
        (np.full((6, 6), np.nan), "NaN"),
        (np.diag([1.0, 1.0, 1.0, 1.0, 1.0, -1.0]), "not positive semidefinite"),
        (np.ones((6, 6)) - np.eye(6), "not positive semidefinite"),
        (np.eye(6).astype(np.complex128), "real"),
        ([[1.0]], "numpy array"),
    ],
)
def test_bad_output_grams_are_refused_in_one_sentence(h: object, match: str) -> None:
    w = decaying(4, 6, 39)
    with pytest.raises(DecompositionError, match=match):
        decompose(w, "whiten", 2, gram=np.eye(4), output_gram=h)  # type: ignore[arg-type]


def test_both_output_weightings_are_refused() -> None:
    w = decaying(4, 6, 40)
    with pytest.raises(DecompositionError, match="not both"):
        decompose(w, "whiten", 2, gram=np.eye(4), output_weight=np.ones(6), output_gram=np.eye(6))
