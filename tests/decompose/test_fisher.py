"""FWSVD minimises the Fisher-weighted error on the output side."""

from __future__ import annotations

import numpy as np
import pytest

from factorlm.decompose import fisher_weighted_svd, spectrum, truncated_svd

from .conftest import brute_force_lowrank


def _weighted_error(w: np.ndarray, approx: np.ndarray, fisher: np.ndarray) -> float:
    return float(np.sum(fisher[None, :] * (w - approx) ** 2))


@pytest.mark.parametrize(("m", "n", "rank"), [(5, 6, 1), (5, 6, 2), (7, 4, 3)])
def test_fwsvd_minimises_its_weighted_objective(m: int, n: int, rank: int) -> None:
    rng = np.random.default_rng(m * n + rank)
    w = rng.standard_normal((m, n))
    fisher = rng.uniform(0.01, 5.0, n)
    closed = _weighted_error(w, fisher_weighted_svd(w, rank, fisher).reconstruct(), fisher)

    def objective(approx: np.ndarray) -> tuple[float, np.ndarray]:
        diff = w - approx
        return float(np.sum(fisher * diff**2)), -2.0 * fisher[None, :] * diff

    best = brute_force_lowrank(objective, (m, n), rank)
    assert closed <= best * (1 + 1e-7) + 1e-10
    np.testing.assert_allclose(closed, best, rtol=1e-6)
    s = spectrum(w, "fwsvd", fisher=fisher)
    np.testing.assert_allclose(closed, np.sum(s[rank:] ** 2), rtol=1e-9)


def test_fwsvd_beats_svd_on_its_objective_and_uniform_fisher_is_svd() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((30, 20))
    fisher = np.logspace(-3, 2, 20)
    weighted = _weighted_error(w, fisher_weighted_svd(w, 5, fisher).reconstruct(), fisher)
    plain = _weighted_error(w, truncated_svd(w, 5).reconstruct(), fisher)
    assert weighted < plain
    np.testing.assert_allclose(
        fisher_weighted_svd(w, 5, np.full(20, 3.0)).reconstruct(),
        truncated_svd(w, 5).reconstruct(),
        atol=1e-12,
    )


def test_zero_fisher_entries_stay_finite() -> None:
    w = np.random.default_rng(2).standard_normal((6, 5))
    fisher = np.array([0.0, 1.0, 0.0, 2.0, 0.5])
    assert np.isfinite(fisher_weighted_svd(w, 2, fisher).reconstruct()).all()
    assert np.isfinite(fisher_weighted_svd(w, 2, np.zeros(5)).reconstruct()).all()
