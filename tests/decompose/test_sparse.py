"""Low-rank plus sparse residuals: structure, density, error and compact storage."""

from __future__ import annotations

import numpy as np
import pytest

from factorlm.decompose import LowRankSparse, lowrank_plus_sparse, truncated_svd


def _weight(m: int = 32, n: int = 24) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((m, n))


def test_unstructured_keeps_the_largest_residual_entries() -> None:
    w = _weight()
    lrs = lowrank_plus_sparse(w, 4, 0.1, "unstructured")
    residual = w - truncated_svd(w, 4).reconstruct()
    k = round(0.1 * w.size)
    assert lrs.nnz == k == np.count_nonzero(lrs.residual)
    kept = np.abs(residual[lrs.residual != 0])
    dropped = np.abs(residual[lrs.residual == 0])
    assert kept.min() >= dropped.max()
    np.testing.assert_allclose(lrs.residual[lrs.residual != 0], residual[lrs.residual != 0])
    err = np.linalg.norm(w - lrs.reconstruct())
    np.testing.assert_allclose(err, np.linalg.norm(dropped), rtol=1e-10)
    assert lrs.num_params == 4 * (32 + 24) + k
    assert lrs.flops_per_token == 2 * (4 * (32 + 24) + k)


def test_column_structure_keeps_whole_input_features_compactly() -> None:
    w = _weight()
    lrs = lowrank_plus_sparse(w, 4, 0.25, "column")
    assert lrs.rows is not None and lrs.values is not None
    assert lrs.rows.dtype == np.int64 and lrs.rows.shape == (8,)
    assert np.all(np.diff(lrs.rows) > 0)
    assert lrs.values.shape == (8, 24)
    np.testing.assert_array_equal(lrs.residual[lrs.rows], lrs.values)
    others = np.setdiff1d(np.arange(32), lrs.rows)
    assert not lrs.residual[others].any()
    residual = w - truncated_svd(w, 4).reconstruct()
    norms = np.linalg.norm(residual, axis=1)
    assert norms[lrs.rows].min() >= norms[others].max()
    # x[:, rows] @ values is the sparse path at run time.
    x = np.random.default_rng(1).standard_normal((3, 32))
    np.testing.assert_allclose(x[:, lrs.rows] @ lrs.values, x @ lrs.residual, atol=1e-12)


@pytest.mark.parametrize(("m", "density"), [(32, 0.5), (30, 0.5), (32, 0.2)])
def test_two_four_structure_along_the_reduction_axis(m: int, density: float) -> None:
    w = np.random.default_rng(2).standard_normal((m, 16))
    lrs = lowrank_plus_sparse(w, 3, density, "2:4")
    nz = lrs.residual != 0
    padded = np.zeros((-(-m // 4) * 4, 16), dtype=bool)
    padded[:m] = nz
    per_group = padded.reshape(-1, 4, 16).sum(axis=1)
    assert per_group.max() <= 2
    assert lrs.nnz == min(round(density * m * 16), int(per_group.size * 2 - (m % 4 == 1) * 16))
    assert np.linalg.norm(w - lrs.reconstruct()) < np.linalg.norm(
        w - truncated_svd(w, 3).reconstruct()
    )


def test_iterations_never_increase_the_error() -> None:
    w = _weight()
    errors = [
        np.linalg.norm(w - lowrank_plus_sparse(w, 3, 0.05, iterations=k).reconstruct())
        for k in (1, 2, 4)
    ]
    assert errors[1] <= errors[0] * (1 + 1e-12) and errors[2] <= errors[1] * (1 + 1e-12)


def test_zero_density_is_plain_low_rank() -> None:
    w = _weight()
    lrs = lowrank_plus_sparse(w, 5, 0.0, "unstructured")
    assert isinstance(lrs, LowRankSparse) and lrs.nnz == 0
    np.testing.assert_allclose(lrs.reconstruct(), truncated_svd(w, 5).reconstruct(), atol=1e-12)


def test_float16_keeps_dtype() -> None:
    w = _weight().astype(np.float16)
    lrs = lowrank_plus_sparse(w, 4, 0.5, "2:4")
    assert lrs.residual.dtype == lrs.low_rank.left.dtype == np.float16


@pytest.mark.parametrize(
    ("density", "structure", "message"),
    [(0.6, "2:4", r"\[0, 0.5\]"), (-0.1, "column", "density"), (0.1, "block", "unknown")],
)
def test_bad_arguments(density: float, structure: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lowrank_plus_sparse(np.ones((8, 8)), 2, density, structure)  # type: ignore[arg-type]
