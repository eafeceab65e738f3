"""Property tests over shapes, dtypes and degenerate weights (rank-1, zero, 1×N)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from factorlm.decompose import (
    decompose,
    kronecker,
    lowrank_plus_sparse,
    propose_kronecker_shapes,
    spectrum,
    truncated_svd,
)

_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_DTYPES = st.sampled_from([np.float16, np.float32])


@st.composite
def weights(draw: st.DrawFn) -> np.ndarray:
    """Random, rank-1, zero and 1×N / N×1 weights in float16 or float32."""
    dtype = draw(_DTYPES)
    m = draw(st.integers(1, 12))
    n = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["random", "rank1", "zero"]))
    if kind == "zero":
        return np.zeros((m, n), dtype=dtype)
    elements = st.floats(-4, 4, width=16, allow_nan=False)
    if kind == "rank1":
        u = draw(arrays(np.float64, (m, 1), elements=elements))
        v = draw(arrays(np.float64, (1, n), elements=elements))
        return (u @ v).astype(dtype)
    return draw(arrays(dtype, (m, n), elements=elements))


def _cast_bound(s: np.ndarray, rank: int, shape: tuple[int, int], dtype: type) -> float:
    """Extra Frobenius error from storing the factors in ``dtype``.

    Each factor entry is rounded with relative error ≤ u (plus an absolute 2⁻²⁵ for float16
    subnormals), and ‖L‖_F ‖R‖_F = Σ_{i<r} s_i for the √s split.
    """
    u = float(np.finfo(dtype).eps) / 2
    m, n = shape
    norm = float(np.sum(s[:rank]))
    tiny = 2.0**-25 * np.sqrt(rank * max(m, n)) * np.sqrt(norm + 1.0) if dtype == np.float16 else 0
    return (2 * u + u * u) * norm + 2 * tiny + 1e-9 * (1 + float(s[0]) if s.size else 1)


@_SETTINGS
@given(w=weights(), data=st.data())
def test_truncated_svd_meets_eckart_young_up_to_the_cast(
    w: np.ndarray, data: st.DataObject
) -> None:
    rank = data.draw(st.integers(1, min(w.shape)))
    lr = truncated_svd(w, rank)
    assert lr.left.dtype == lr.right.dtype == w.dtype
    assert lr.left.shape == (w.shape[0], rank) and lr.right.shape == (rank, w.shape[1])
    assert lr.num_params == rank * sum(w.shape)
    w64 = w.astype(np.float64)
    s = np.linalg.svd(w64, compute_uv=False)
    err = np.linalg.norm(w64 - lr.left.astype(np.float64) @ lr.right.astype(np.float64))
    tail = np.sqrt(np.sum(s[rank:] ** 2))
    assert tail - 1e-9 * (1 + s[0]) <= err <= tail + _cast_bound(s, rank, w.shape, w.dtype.type)


@_SETTINGS
@given(w=weights(), data=st.data())
def test_data_aware_methods_stay_finite_and_typed(w: np.ndarray, data: st.DataObject) -> None:
    m, n = w.shape
    rank = data.draw(st.integers(1, min(m, n)))
    tokens = data.draw(st.integers(1, 2 * m))  # fewer tokens than features: rank-deficient Gram
    x = np.random.default_rng(m * 31 + n).standard_normal((tokens, m))
    stats = {
        "gram": x.T @ x,
        "mean_abs": np.abs(x).mean(axis=0),
        "fisher": np.random.default_rng(n).uniform(0, 2, n),
    }
    for method in ("svd", "whiten", "asvd", "fwsvd"):
        lr = decompose(w, method, rank, **stats)
        assert lr.left.dtype == w.dtype and np.isfinite(lr.reconstruct()).all()
        s = spectrum(w, method, **stats)
        assert (
            s.shape == (min(m, n),) and np.all(s >= 0) and np.all(np.diff(s) <= 1e-12 * (1 + s[0]))
        )


@_SETTINGS
@given(w=weights(), data=st.data())
def test_kronecker_error_never_exceeds_the_weight(w: np.ndarray, data: st.DataObject) -> None:
    proposals = propose_kronecker_shapes(*w.shape)
    if not proposals:
        return
    a_shape, b_shape = data.draw(st.sampled_from(proposals))
    terms = data.draw(st.integers(1, min(a_shape[0] * a_shape[1], b_shape[0] * b_shape[1])))
    kf = kronecker(w, a_shape, terms)
    assert kf.shape == w.shape and kf.a.dtype == w.dtype
    w64 = w.astype(np.float64)
    err = np.linalg.norm(w64 - kf.reconstruct().astype(np.float64))
    assert err <= np.linalg.norm(w64) * (1 + 2 * float(np.finfo(w.dtype).eps)) + 1e-6


@_SETTINGS
@given(w=weights(), data=st.data())
def test_two_four_holds_for_every_shape(w: np.ndarray, data: st.DataObject) -> None:
    rank = data.draw(st.integers(1, min(w.shape)))
    density = data.draw(st.floats(0, 0.5))
    lrs = lowrank_plus_sparse(w, rank, density, "2:4")
    m, n = w.shape
    padded = np.zeros((-(-m // 4) * 4, n), dtype=bool)
    padded[:m] = lrs.residual != 0
    assert padded.reshape(-1, 4, n).sum(axis=1).max(initial=0) <= 2
    assert lrs.residual.dtype == w.dtype
