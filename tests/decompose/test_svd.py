"""Truncated SVD: Eckart–Young optimality, the randomized path, dtypes and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from factorlm.decompose import LowRank, truncated_svd


def _decaying(m: int, n: int, seed: int, decay: float = 0.6) -> np.ndarray:
    """A random matrix with singular values ``(i + 1) ** -decay``."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = (np.arange(min(m, n)) + 1.0) ** -decay
    return (u * s) @ v.T


@pytest.mark.parametrize("shape", [(40, 25), (25, 40), (1, 7), (9, 1)])
def test_eckart_young_error_is_the_spectrum_tail(shape: tuple[int, int]) -> None:
    w = np.random.default_rng(0).standard_normal(shape)
    s = np.linalg.svd(w, compute_uv=False)
    for rank in range(1, min(shape) + 1):
        lr = truncated_svd(w, rank, method="exact")
        assert lr.rank == rank and lr.shape == shape
        err = np.linalg.norm(w - lr.reconstruct())
        np.testing.assert_allclose(err, np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-9, atol=1e-12)


def test_singular_values_split_as_square_roots() -> None:
    w = _decaying(30, 20, 1)
    lr = truncated_svd(w, 5, method="exact")
    s = np.linalg.svd(w, compute_uv=False)[:5]
    np.testing.assert_allclose(np.linalg.norm(lr.left, axis=0), np.sqrt(s), rtol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(lr.right, axis=1), np.sqrt(s), rtol=1e-10)


def test_counts() -> None:
    lr = LowRank(np.zeros((6, 2)), np.zeros((2, 10)))
    assert lr.num_params == 2 * 16
    assert lr.flops_per_token == 2 * 2 * 16


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(600, 400), (400, 900)])
def test_randomized_within_one_percent_of_exact(shape: tuple[int, int], dtype: type) -> None:
    w = _decaying(*shape, seed=2, decay=0.3).astype(dtype)
    for rank in (8, 40, 100):
        exact = np.linalg.norm(w - truncated_svd(w, rank, method="exact").reconstruct())
        approx = np.linalg.norm(w - truncated_svd(w, rank, method="randomized").reconstruct())
        assert exact <= approx * (1 + 1e-6)
        assert approx <= 1.01 * exact


def test_randomized_is_deterministic_and_uses_the_given_rng() -> None:
    w = _decaying(300, 300, 3)
    a = truncated_svd(w, 20, method="randomized").left
    b = truncated_svd(w, 20, method="randomized").left
    np.testing.assert_array_equal(a, b)
    c = truncated_svd(w, 20, method="randomized", rng=np.random.default_rng(7)).left
    assert not np.array_equal(a, c)
    err_c = np.linalg.norm(w - truncated_svd(w, 20, rng=np.random.default_rng(7)).reconstruct())
    err_exact = np.linalg.norm(w - truncated_svd(w, 20, method="exact").reconstruct())
    assert err_c <= 1.01 * err_exact


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_result_keeps_the_weight_dtype(dtype: type) -> None:
    w = _decaying(64, 32, 4).astype(dtype)
    lr = truncated_svd(w, 8)
    assert lr.left.dtype == dtype and lr.right.dtype == dtype
    assert lr.reconstruct().dtype == dtype


@pytest.mark.parametrize(
    ("weight", "rank", "message"),
    [
        (np.array([[1.0, np.nan], [0.0, 1.0]]), 1, "NaN or Inf"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), 1, "NaN or Inf"),
        (np.ones((3, 4)), 0, "out of range"),
        (np.ones((3, 4)), 4, "out of range"),
        (np.ones((3, 4), dtype=np.int64), 1, "dtype int64"),
        (np.ones(4), 1, "2-D"),
        (np.ones((3, 4)), 1.5, "integer"),
    ],
)
def test_bad_input_raises_value_error(weight: np.ndarray, rank: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        truncated_svd(weight, rank)  # type: ignore[arg-type]
