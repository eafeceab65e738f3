"""Sequential (error-correcting) targets, loss-aware output weighting, shrinkage and robustness.

The closed forms are checked against an optimiser that knows nothing about SVD
(``brute_force_lowrank``), against an independent derivation from the raw tokens (QR), and
against the objective's Pythagorean split.
"""

from __future__ import annotations

import numpy as np
import pytest

from factorlm.decompose import (
    DecompositionError,
    best_blend,
    best_shrinkage,
    blend_gram,
    corrected_weight,
    decompose,
    held_back_loglik,
    prepare,
    prepared_lowrank,
    residual_error,
    shrink_gram,
    spectrum,
    whitened_svd,
)

from .conftest import brute_force_lowrank, decaying


def _inputs(tokens: int, m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix, _ = np.linalg.qr(rng.standard_normal((m, m)))
    return (rng.standard_normal((tokens, m)) * np.logspace(-1, 1, m)) @ mix


def _pair(tokens: int, m: int, seed: int, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Original inputs ``X`` and the perturbed ``X̂`` a compressed upstream would feed."""
    x = _inputs(tokens, m, seed)
    rng = np.random.default_rng(seed + 100)
    drift = np.eye(m) + noise * rng.standard_normal((m, m)) / np.sqrt(m)
    return x, x @ drift + 0.05 * rng.standard_normal((tokens, m))


def _sequential(w: np.ndarray, x: np.ndarray, xh: np.ndarray, rank: int) -> np.ndarray:
    target = corrected_weight(w, xh.T @ xh, xh.T @ x)
    return whitened_svd(target, rank, xh.T @ xh).reconstruct()


@pytest.mark.parametrize(("m", "n", "rank", "seed"), [(7, 5, 2, 0), (5, 8, 3, 1), (6, 6, 1, 2)])
def test_sequential_closed_form_is_the_global_optimum(m: int, n: int, rank: int, seed: int) -> None:
    x, xh = _pair(60, m, seed)
    w = decaying(m, n, seed + 10, decay=0.3)
    target = x @ w

    def objective(mat: np.ndarray) -> tuple[float, np.ndarray]:
        resid = xh @ mat - target
        return float(np.sum(resid**2)), 2.0 * xh.T @ resid

    closed = objective(_sequential(w, x, xh, rank))[0]
    best = brute_force_lowrank(objective, (m, n), rank)
    assert closed <= best * (1 + 1e-7) + 1e-10
    np.testing.assert_allclose(closed, best, rtol=1e-6)


def test_sequential_matches_a_derivation_from_the_tokens() -> None:
    """``X̂ M = [P_X̂ X W]_r`` with ``P`` the projection on X̂'s columns (QR, no Grams)."""
    m, n, rank = 9, 7, 3
    x, xh = _pair(80, m, 4)
    w = decaying(m, n, 5, decay=0.2)
    q, r = np.linalg.qr(xh)
    u, s, vt = np.linalg.svd(q.T @ (x @ w), full_matrices=False)
    independent = np.linalg.solve(r, (u[:, :rank] * s[:rank]) @ vt[:rank])
    np.testing.assert_allclose(_sequential(w, x, xh, rank), independent, rtol=1e-5, atol=1e-8)


def test_pythagorean_split_and_gram_only_error() -> None:
    m, n, rank = 10, 6, 2
    x, xh = _pair(90, m, 6)
    w = decaying(m, n, 7)
    g, gh, c = x.T @ x, xh.T @ xh, xh.T @ x
    best = corrected_weight(w, gh, c)
    approx = _sequential(w, x, xh, rank)
    direct = float(np.sum((x @ w - xh @ approx) ** 2))
    np.testing.assert_allclose(residual_error(w, approx, g, gh, c), direct, rtol=1e-7)
    floor = float(np.sum((x @ w - xh @ best) ** 2))
    np.testing.assert_allclose(
        direct, floor + float(np.sum((xh @ (best - approx)) ** 2)), rtol=1e-7
    )
    # The tail of the whitened spectrum of M* is exactly the rank-dependent part.
    s = spectrum(best, "whiten", gram=gh)
    np.testing.assert_allclose(direct - floor, np.sum(s[rank:] ** 2), rtol=1e-6)


def test_correction_beats_fitting_each_weight_to_the_original_inputs() -> None:
    m, n, rank = 24, 16, 6
    x, xh = _pair(400, m, 8, noise=0.5)
    w = decaying(m, n, 9, decay=0.2)
    plain = whitened_svd(w, rank, x.T @ x).reconstruct()
    corrected = _sequential(w, x, xh, rank)
    err_plain = float(np.sum((x @ w - xh @ plain) ** 2))
    err_corrected = float(np.sum((x @ w - xh @ corrected) ** 2))
    assert err_corrected < 0.7 * err_plain


def test_identical_inputs_reduce_to_plain_whitening() -> None:
    x = _inputs(200, 12, 10)
    w = decaying(12, 9, 11)
    g = x.T @ x
    np.testing.assert_allclose(corrected_weight(w, g, g), w, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("condition", [np.inf, 1e12])
def test_singular_and_ill_conditioned_grams_stay_finite(condition: float) -> None:
    """A Gram from fewer tokens than features (singular) or with a 1e12 condition number."""
    m, n, rank = 16, 12, 4
    rng = np.random.default_rng(12)
    w = decaying(m, n, 13)
    if np.isinf(condition):
        x = rng.standard_normal((5, m))  # rank 5 < 16: singular
        xh = x + 0.01 * rng.standard_normal((5, m))
    else:
        basis, _ = np.linalg.qr(rng.standard_normal((m, m)))
        scales = np.logspace(0, -6, m)  # eigenvalues of XᵀX span 1e12
        x = rng.standard_normal((400, m)) @ basis * scales @ basis.T
        xh = x + 1e-4 * rng.standard_normal(x.shape) * scales
    g, gh, c = x.T @ x, xh.T @ xh, xh.T @ x
    for ridge in (0.0, 1e-3):
        target = corrected_weight(w, gh, c, ridge=ridge)
        assert np.isfinite(target).all()
        factors = prepared_lowrank(target, "whiten", rank, gram=gh)
        approx = factors.reconstruct()
        assert np.isfinite(approx).all()
        if ridge > 0:  # a ridge trades calibration fit for stability: only finiteness here
            continue
        # Never worse than leaving the weight uncorrected at the same rank, up to damping.
        plain = whitened_svd(w, rank, g).reconstruct()
        ours = residual_error(w, approx, g, gh, c)
        theirs = residual_error(w, plain, g, gh, c)
        assert ours <= theirs * (1 + 1e-3) + 1e-9 * np.trace(g) * np.sum(w**2)


def test_all_zero_inputs_leave_the_weight_alone() -> None:
    w = decaying(6, 4, 14)
    zeros = np.zeros((6, 6))
    np.testing.assert_array_equal(corrected_weight(w, zeros, zeros), w)


def test_bad_cross_and_ridge_are_refused() -> None:
    w = decaying(6, 4, 15)
    g = np.eye(6)
    with pytest.raises(DecompositionError, match="cross has shape"):
        corrected_weight(w, g, np.eye(5))
    with pytest.raises(DecompositionError, match="NaN"):
        corrected_weight(w, g, np.full((6, 6), np.nan))
    with pytest.raises(DecompositionError, match="ridge"):
        corrected_weight(w, g, g, ridge=-1.0)


@pytest.mark.parametrize(("m", "n"), [(7, 5), (5, 8)])
def test_output_weighted_whitening_is_the_two_sided_optimum(m: int, n: int) -> None:
    """``‖X (W − M) diag(b)‖``: closed form = brute force, through every entry point."""
    rank = 2
    x = _inputs(50, m, 16)
    w = decaying(m, n, 17, decay=0.3)
    weights = np.random.default_rng(18).uniform(0.01, 5.0, size=n)
    b = np.sqrt(weights)

    def objective(mat: np.ndarray) -> tuple[float, np.ndarray]:
        resid = x @ (mat - w) * b[None, :]
        return float(np.sum(resid**2)), 2.0 * x.T @ (resid * b[None, :])

    g = x.T @ x
    closed = decompose(w, "whiten", rank, gram=g, output_weight=weights).reconstruct()
    best = brute_force_lowrank(objective, (m, n), rank)
    np.testing.assert_allclose(objective(closed)[0], best, rtol=1e-6)
    for other in (
        prepared_lowrank(w, "whiten", rank, gram=g, output_weight=weights),
        prepare(w, "whiten", gram=g, output_weight=weights, keep=0).lowrank(w, rank),
        prepare(w, "whiten", gram=g, output_weight=weights).lowrank(w, rank),
    ):
        np.testing.assert_allclose(other.reconstruct(), closed, rtol=1e-6, atol=1e-9)
    tail = spectrum(w, "whiten", gram=g, output_weight=weights)[rank:]
    np.testing.assert_allclose(objective(closed)[0], np.sum(tail**2), rtol=1e-6)
    # Ignoring the output weights costs error under the weighted objective.
    unweighted = decompose(w, "whiten", rank, gram=g).reconstruct()
    assert objective(unweighted)[0] > objective(closed)[0]


def test_output_weight_of_the_wrong_length_is_refused() -> None:
    w = decaying(6, 4, 19)
    with pytest.raises(DecompositionError, match="output_weight"):
        decompose(w, "whiten", 2, gram=np.eye(6), output_weight=np.ones(5))


def test_shrinkage_keeps_the_diagonal_and_is_chosen_by_held_back_likelihood() -> None:
    rng = np.random.default_rng(20)
    d = 40
    g = rng.standard_normal((100, d))
    gram = g.T @ g
    half = shrink_gram(gram, 0.5)
    np.testing.assert_allclose(np.diag(half), np.diag(gram))
    np.testing.assert_allclose(half - np.diag(np.diag(half)), 0.5 * (gram - np.diag(np.diag(gram))))
    # Independent features, few tokens: the sample correlations are noise, shrink a lot.
    few = rng.standard_normal((60, d))
    held = rng.standard_normal((2000, d))
    assert best_shrinkage(few.T @ few, 60, held.T @ held, 2000) >= 0.4
    # Strongly correlated features and plenty of tokens: keep the correlations.
    mix = rng.standard_normal((d, d))
    many = rng.standard_normal((5000, d)) @ mix
    held = rng.standard_normal((5000, d)) @ mix
    assert best_shrinkage(many.T @ many, 5000, held.T @ held, 5000) <= 0.03


def test_blend_is_the_per_token_mixture_in_the_users_units() -> None:
    rng = np.random.default_rng(21)
    x, y = rng.standard_normal((30, 6)), 3.0 * rng.standard_normal((90, 6))
    gram, generic = x.T @ x, y.T @ y
    np.testing.assert_allclose(blend_gram(gram, 30, generic, 90, 0.0), gram)
    np.testing.assert_allclose(blend_gram(gram, 30, generic, 90, 1.0), generic * 30 / 90)
    # per token, the blend is the second moment of a β-weighted mixture of the two token sets
    weights = np.r_[np.full(30, 0.7 / 30), np.full(90, 0.3 / 90)]
    tokens = np.vstack([x, y])
    mixture = (tokens * weights[:, None]).T @ tokens
    np.testing.assert_allclose(blend_gram(gram, 30, generic, 90, 0.3) / 30, mixture, rtol=1e-12)
    with pytest.raises(DecompositionError, match="blend"):
        blend_gram(gram, 30, generic, 90, 1.5)
    with pytest.raises(DecompositionError, match="shape"):
        blend_gram(gram, 30, np.eye(5), 90, 0.5)


def test_held_back_likelihood_is_the_mean_gaussian_log_density() -> None:
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(22)
    d = 5
    train = rng.standard_normal((200, d)) @ rng.standard_normal((d, d))
    test = rng.standard_normal((50, d)) @ rng.standard_normal((d, d))
    for alpha in (0.0, 0.3):
        sigma = shrink_gram(train.T @ train / 200, alpha)
        brute = float(np.mean(multivariate_normal(np.zeros(d), sigma).logpdf(test)))
        got = held_back_loglik(train.T @ train, 200, test.T @ test, 50, alpha)
        assert got == pytest.approx(brute, rel=1e-7)  # the factor's 1e-10 damping


def test_blend_is_chosen_by_held_back_likelihood() -> None:
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(23)
    d = 40
    mix = rng.standard_normal((d, d))
    broad = rng.standard_normal((20000, d)) @ mix  # generic text: the same source, plenty of it
    # A user with few tokens of that source: their own Gram is noise, lean on the generic one.
    few, held = rng.standard_normal((50, d)) @ mix, rng.standard_normal((3000, d)) @ mix
    assert best_blend(few.T @ few, 50, held.T @ held, 3000, broad.T @ broad, 20000) >= 0.5
    # Plenty of the user's own, different source: the generic Gram only hurts.
    other = rng.standard_normal((d, d))
    own, held = rng.standard_normal((8000, d)) @ other, rng.standard_normal((4000, d)) @ other
    assert best_blend(own.T @ own, 8000, held.T @ held, 4000, broad.T @ broad, 20000) <= 0.1
    # The choice is the argmax of the likelihood over the grid, checked by brute force.
    grid = (0.0, 0.2, 0.6)
    scores = [
        np.mean(
            multivariate_normal(
                np.zeros(d), blend_gram(few.T @ few, 50, broad.T @ broad, 20000, b) / 50
            ).logpdf(held)
        )
        for b in grid
    ]
    chosen = best_blend(few.T @ few, 50, held.T @ held, 3000, broad.T @ broad, 20000, grid)
    assert chosen == grid[int(np.argmax(scores))]
