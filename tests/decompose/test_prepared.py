"""One-pass planning path: ``prepare`` (Gram eigendecomposition) vs ``spectrum`` and ``decompose``."""

from __future__ import annotations

import numpy as np
import pytest

from factorlm.decompose import decompose, spectrum
from factorlm.decompose.methods import prepare


def _stats(m: int, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3 * m, m)) * rng.uniform(0.1, 3.0, m)  # uneven feature scales
    return {
        "gram": x.T @ x,
        "mean_abs": np.abs(x).mean(axis=0),
        "fisher": rng.uniform(0.05, 2.0, n),
    }


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("method", ["svd", "whiten", "asvd", "fwsvd"])
@pytest.mark.parametrize(("m", "n"), [(24, 40), (40, 24), (32, 32)])
def test_prepared_matches_spectrum_and_exact_decompose(method: str, m: int, n: int) -> None:
    rng = np.random.default_rng(m * 7 + n)
    w = rng.standard_normal((m, n)) * (np.arange(n) + 1.0) ** -0.7
    stats = _stats(m, n, m + n)
    prepared = prepare(w, method, **stats)
    s = spectrum(w, method, **stats)
    np.testing.assert_allclose(prepared.singular_values, s, rtol=1e-7, atol=1e-7 * s[0])
    spectrum_only = prepare(w, method, keep=0, **stats)  # what the planner does
    np.testing.assert_allclose(spectrum_only.singular_values, prepared.singular_values, rtol=1e-9)
    for rank in (1, 5, min(m, n) - 1):
        want = decompose(w, method, rank, svd_method="exact", **stats).reconstruct()
        assert _relative(prepared.lowrank(w, rank).reconstruct(), want) < 1e-8
        assert _relative(spectrum_only.lowrank(w, rank).reconstruct(), want) < 1e-8


@pytest.mark.parametrize(("m", "n"), [(24, 40), (40, 24)])
def test_whitened_output_error_is_the_spectrum_tail(m: int, n: int) -> None:
    """‖X (W − M)‖² = Σ_{i ≥ r} s_i², the data-aware Eckart–Young bound, on both sides."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, m)) * rng.uniform(0.1, 3.0, m)
    w = rng.standard_normal((m, n))
    prepared = prepare(w, "whiten", gram=x.T @ x)
    s = prepared.singular_values
    for rank in (2, 9):
        err = np.linalg.norm(x @ (w - prepared.lowrank(w, rank).reconstruct())) ** 2
        np.testing.assert_allclose(err, np.sum(s[rank:] ** 2), rtol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_full_rank_is_exact_and_keeps_the_dtype(dtype: type) -> None:
    rng = np.random.default_rng(1)
    for shape in [(12, 20), (20, 12)]:
        w = rng.standard_normal(shape).astype(dtype)
        lr = prepare(w, "svd").lowrank(w, min(shape))
        assert lr.left.dtype == dtype and lr.right.dtype == dtype
        tol = 1e-5 if dtype == np.float32 else 5e-3
        assert _relative(lr.reconstruct().astype(np.float64), w.astype(np.float64)) < tol


def test_keep_limits_the_cache_and_larger_ranks_fall_back() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((30, 50)).astype(np.float32)
    prepared = prepare(w, "svd", keep=6)
    assert prepared.vectors.shape == (30, 6) and prepared.vectors.dtype == np.float32
    assert prepared.singular_values.shape == (30,)
    big = prepared.lowrank(w, 10).reconstruct()
    np.testing.assert_allclose(big, decompose(w, "svd", 10).reconstruct(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["zero", "rank1"])
def test_degenerate_weights_stay_finite(kind: str) -> None:
    rng = np.random.default_rng(3)
    for shape in [(8, 13), (13, 8)]:
        if kind == "zero":
            w = np.zeros(shape)
        else:
            w = np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1]))
        for method in ("svd", "whiten", "asvd", "fwsvd"):
            stats = _stats(*shape, 4)
            lr = prepare(w, method, **stats).lowrank(w, 3)
            assert np.isfinite(lr.left).all() and np.isfinite(lr.right).all()
            assert _relative(lr.reconstruct(), w) < 1e-6 or kind == "zero"
            if kind == "zero":
                assert np.abs(lr.reconstruct()).max() == 0.0


def test_wrong_weight_is_refused() -> None:
    w = np.ones((4, 6))
    with pytest.raises(ValueError, match="prepared with shape"):
        prepare(w, "svd").lowrank(np.ones((6, 4)), 2)
    with pytest.raises(ValueError, match="needs gram"):
        prepare(np.ones((6, 4)), "whiten")
