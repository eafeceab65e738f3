"""The planner's dispatcher: every method name, and spectra that price each rank exactly."""

from __future__ import annotations

import numpy as np
import pytest

from factorlm.decompose import (
    METHODS,
    activation_scaled_svd,
    decompose,
    fisher_weighted_svd,
    spectrum,
    truncated_svd,
    whitened_svd,
)


def test_dispatcher_matches_the_named_functions() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 12)).astype(np.float32)
    x = rng.standard_normal((50, 16))
    stats = {"gram": x.T @ x, "mean_abs": np.abs(x).mean(0), "fisher": rng.uniform(0.1, 1, 12)}
    expected = {
        "svd": truncated_svd(w, 4),
        "whiten": whitened_svd(w, 4, stats["gram"]),
        "drone": whitened_svd(w, 4, stats["gram"]),
        "asvd": activation_scaled_svd(w, 4, stats["mean_abs"]),
        "fwsvd": fisher_weighted_svd(w, 4, stats["fisher"]),
    }
    assert set(expected) == set(METHODS)
    for method, want in expected.items():
        got = decompose(w, method, 4, **stats)
        assert got.left.dtype == np.float32
        np.testing.assert_array_equal(got.reconstruct(), want.reconstruct())


def test_svd_spectrum_is_the_singular_values() -> None:
    w = np.random.default_rng(1).standard_normal((9, 14))
    np.testing.assert_allclose(spectrum(w, "svd"), np.linalg.svd(w, compute_uv=False), rtol=1e-12)


@pytest.mark.parametrize("method", ["svd", "asvd", "fwsvd"])
def test_spectrum_tail_prices_every_rank(method: str) -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((10, 7))
    mean_abs, fisher = rng.uniform(0.1, 2, 10), rng.uniform(0.1, 2, 7)
    s = spectrum(w, method, mean_abs=mean_abs, fisher=fisher)
    left_scale = mean_abs**0.5 if method == "asvd" else np.ones(10)
    right_scale = np.sqrt(fisher) if method == "fwsvd" else np.ones(7)
    for rank in range(1, 8):
        diff = w - decompose(w, method, rank, mean_abs=mean_abs, fisher=fisher).reconstruct()
        err = np.sum((left_scale[:, None] * diff * right_scale[None, :]) ** 2)
        np.testing.assert_allclose(err, np.sum(s[rank:] ** 2), rtol=1e-9, atol=1e-20)
