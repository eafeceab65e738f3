"""DRONE / whitened SVD and ASVD: optimality against brute force, robustness of the Gram rule."""

from __future__ import annotations

import numpy as np
import pytest

from factorlm.decompose import (
    activation_scaled_svd,
    decompose,
    spectrum,
    truncated_svd,
    whitened_svd,
)

from .conftest import brute_force_lowrank, decaying


def _anisotropic_inputs(tokens: int, m: int, seed: int) -> np.ndarray:
    """Activations whose feature scales span two orders of magnitude, with correlations."""
    rng = np.random.default_rng(seed)
    mix, _ = np.linalg.qr(rng.standard_normal((m, m)))
    return (rng.standard_normal((tokens, m)) * np.logspace(-1, 1, m)) @ mix


def _data_error(x: np.ndarray, w: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (w - approx)) ** 2)


@pytest.mark.parametrize(("m", "n", "rank"), [(6, 5, 1), (6, 5, 2), (5, 7, 3)])
def test_whitened_svd_reaches_the_brute_force_optimum(m: int, n: int, rank: int) -> None:
    x = _anisotropic_inputs(40, m, seed=m + n)
    w = np.random.default_rng(rank).standard_normal((m, n))
    gram = x.T @ x
    closed = _data_error(x, w, whitened_svd(w, rank, gram).reconstruct())

    def objective(approx: np.ndarray) -> tuple[float, np.ndarray]:
        diff = w - approx
        return float(np.sum((x @ diff) ** 2)), -2.0 * gram @ diff

    best = brute_force_lowrank(objective, (m, n), rank)
    # The closed form is the global optimum: no start does better, and the best start matches.
    assert closed <= best * (1 + 1e-7) + 1e-10
    np.testing.assert_allclose(closed, best, rtol=1e-6)


def test_whitened_beats_plain_svd_on_anisotropic_inputs() -> None:
    m, n, rank = 48, 32, 8
    x = _anisotropic_inputs(400, m, seed=3)
    w = decaying(m, n, seed=4, decay=0.2)
    whitened = _data_error(x, w, whitened_svd(w, rank, x.T @ x).reconstruct())
    plain = _data_error(x, w, truncated_svd(w, rank).reconstruct())
    assert whitened < 0.8 * plain


def test_whitened_spectrum_tail_is_the_data_error() -> None:
    m, n = 20, 12
    x = _anisotropic_inputs(100, m, seed=5)
    w = np.random.default_rng(6).standard_normal((m, n))
    gram = x.T @ x
    s = spectrum(w, "whiten", gram=gram)
    assert s.shape == (12,) and np.all(np.diff(s) <= 0)
    for rank in (1, 4, 11):
        err = _data_error(x, w, whitened_svd(w, rank, gram).reconstruct())
        # Equal up to the damping term δ‖W − M‖², δ = 1e-10·mean(diag G).
        np.testing.assert_allclose(err, np.sum(s[rank:] ** 2), rtol=1e-7)
    np.testing.assert_allclose(spectrum(w, "drone", gram=gram), s)


def test_rank_deficient_gram_is_damped_to_the_data_optimum() -> None:
    # 3 tokens in 8 features: XᵀX has rank 3, a plain Cholesky fails.
    m, n, rank = 8, 6, 2
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, m))
    w = rng.standard_normal((m, n))
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(x.T @ x)
    lr = whitened_svd(w, rank, x.T @ x)
    assert np.isfinite(lr.reconstruct()).all()
    # Optimum of ‖X (W − M)‖ over rank-2 M: X = U Σ Vᵀ, so it is the tail of ΣVᵀW's spectrum.
    _, sig, vt = np.linalg.svd(x, full_matrices=False)
    tail = np.linalg.svd(sig[:, None] * (vt @ w), compute_uv=False)[rank:]
    np.testing.assert_allclose(_data_error(x, w, lr.reconstruct()), np.sum(tail**2), rtol=1e-6)
    # Directions never excited keep a bounded, least-squares answer, not a blow-up.
    assert np.linalg.norm(lr.reconstruct()) <= 2 * np.linalg.norm(w)


def test_ill_conditioned_gram() -> None:
    m, n = 30, 20
    rng = np.random.default_rng(8)
    x = rng.standard_normal((200, m)) * np.logspace(-9, 0, m)  # condition number 1e18
    w = rng.standard_normal((m, n))
    gram = x.T @ x
    lr = whitened_svd(w, 5, gram)
    s = spectrum(w, "whiten", gram=gram)
    assert np.isfinite(lr.reconstruct()).all()
    err = _data_error(x, w, lr.reconstruct())
    # Damping adds at most δ‖W − M‖² with δ ≤ 1e-10·mean(diag G) on top of the optimum.
    np.testing.assert_allclose(err, np.sum(s[5:] ** 2), rtol=1e-6)


def test_zero_gram_falls_back_to_plain_svd() -> None:
    w = decaying(10, 8, seed=9)
    np.testing.assert_allclose(
        whitened_svd(w, 3, np.zeros((10, 10))).reconstruct(),
        truncated_svd(w, 3).reconstruct(),
        atol=1e-12,
    )


def test_asvd_minimises_its_scaled_objective_and_alpha_zero_is_svd() -> None:
    m, n, rank = 7, 5, 2
    rng = np.random.default_rng(10)
    w = rng.standard_normal((m, n))
    mean_abs = rng.uniform(0.1, 3.0, m)
    scale = mean_abs**0.5
    closed = np.linalg.norm(
        scale[:, None] * (w - activation_scaled_svd(w, rank, mean_abs).reconstruct())
    )

    def objective(approx: np.ndarray) -> tuple[float, np.ndarray]:
        diff = scale[:, None] * (w - approx)
        return float(np.sum(diff**2)), -2.0 * scale[:, None] * diff

    np.testing.assert_allclose(closed**2, brute_force_lowrank(objective, (m, n), rank), rtol=1e-6)
    np.testing.assert_allclose(
        activation_scaled_svd(w, rank, mean_abs, alpha=0.0).reconstruct(),
        truncated_svd(w, rank).reconstruct(),
        atol=1e-12,
    )
    s = spectrum(w, "asvd", mean_abs=mean_abs)
    np.testing.assert_allclose(closed**2, np.sum(s[rank:] ** 2), rtol=1e-9)


def test_asvd_zero_statistics_stay_finite() -> None:
    w = decaying(6, 4, seed=11)
    mean_abs = np.array([0.0, 1.0, 2.0, 0.0, 3.0, 1.0])
    assert np.isfinite(activation_scaled_svd(w, 2, mean_abs).reconstruct()).all()
    assert np.isfinite(activation_scaled_svd(w, 2, np.zeros(6)).reconstruct()).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "whiten", "gram": np.eye(5)}, r"gram has shape \(5, 5\)"),
        ({"method": "whiten"}, "needs gram"),
        ({"method": "drone", "gram": np.full((6, 6), np.nan)}, "gram contains NaN"),
        ({"method": "drone", "gram": -np.eye(6)}, "negative diagonal"),
        ({"method": "asvd", "mean_abs": np.ones(4)}, r"mean_abs has shape \(4,\)"),
        ({"method": "asvd", "mean_abs": -np.ones(6)}, "negative"),
        ({"method": "asvd", "mean_abs": np.ones(6), "alpha": -1.0}, "alpha"),
        ({"method": "fwsvd", "fisher": np.ones(6)}, r"fisher has shape \(6,\)"),
        ({"method": "fwsvd"}, "needs fisher"),
        ({"method": "tucker"}, "unknown"),
    ],
)
def test_mismatched_statistics_raise(kwargs: dict[str, object], message: str) -> None:
    w = np.ones((6, 4))
    with pytest.raises(ValueError, match=message):
        decompose(w, rank=2, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        spectrum(w, **kwargs)  # type: ignore[arg-type]
