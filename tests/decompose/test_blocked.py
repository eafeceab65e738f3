"""``PreparedWeight.lowrank`` forms its products in blocks of W: same numbers, bounded memory.

The reference is the whole-matrix math the blocked products replace: ``Z = _transform(W)``,
``raw = U_rᵀ Z`` and its row norms on the wide side, ``W B V_r / √s`` on the tall side.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass

import numpy as np
import pytest

from factorlm.decompose import methods
from factorlm.decompose.methods import MethodInputs, prepare


def _inputs(m: int, n: int, seed: int, *, output_weight: bool = False) -> MethodInputs:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3 * m, m)) * rng.uniform(0.1, 3.0, m)  # uneven feature scales
    return MethodInputs(
        gram=x.T @ x,
        mean_abs=np.abs(x).mean(axis=0),
        fisher=rng.uniform(0.05, 2.0, n),
        output_weight=rng.uniform(0.05, 2.0, n) if output_weight else None,
    )


def _whole(
    weight: np.ndarray, vectors: np.ndarray, s: np.ndarray, method: str, inputs: MethodInputs
) -> tuple[np.ndarray, np.ndarray]:
    """The factors from whole float64 matrices (what lowrank computed before blocking)."""
    if weight.shape[0] <= weight.shape[1]:
        transform = methods._transform(weight, method, inputs)
        raw = vectors.T @ transform.matrix
        t = np.sqrt(np.linalg.norm(raw, axis=1))
        left = transform.undo_left(vectors * t[None, :])
        right = transform.undo_right(raw / t[:, None])
    else:
        b = methods._output_scale(methods._output_vector(weight.shape, method, inputs))
        y = weight.astype(np.float64) * (1.0 if b is None else b[None, :])
        t = np.sqrt(s)
        left = (y @ vectors) / t[None, :]
        right = t[:, None] * vectors.T / (1.0 if b is None else b[None, :])
    return left.astype(weight.dtype), right.astype(weight.dtype)


def _vectors(
    weight: np.ndarray, method: str, inputs: MethodInputs, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    s, vectors = methods._eigh_descending(methods._small_gram(weight, method, inputs))
    return s[:rank], np.asfortranarray(vectors[:, :rank])


def _close(got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape and got.flags.c_contiguous
    scale = float(np.abs(want.astype(np.float64)).max())
    assert float(np.abs(got.astype(np.float64) - want).max()) <= rtol * scale


@pytest.mark.parametrize("method", ["svd", "whiten", "drone", "asvd", "fwsvd", "whiten+output"])
@pytest.mark.parametrize(("m", "n"), [(48, 700), (700, 48)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_blocks_give_the_whole_matrix_numbers(method: str, m: int, n: int, dtype: type) -> None:
    """A weight spanning many blocks (and a transposed, Fortran-ordered one, as streamed weights
    arrive), one pass and two: within 1e-12 of the whole-matrix factors in float64, one float32
    ulp in float32; one block in one pass is the whole-matrix math bit for bit."""
    name = method.removesuffix("+output")
    inputs = _inputs(m, n, m + n, output_weight=method.endswith("+output"))
    rng = np.random.default_rng(m * n)
    w: np.ndarray = (rng.standard_normal((m, n)) * np.linspace(0.05, 2.0, n)).astype(dtype)
    rtol = 1e-12 if dtype == np.float64 else 3e-7
    for weight in (w, np.asfortranarray(w)):
        s, vectors = _vectors(weight, name, inputs, 17)
        want = _whole(weight, vectors, s, name, inputs)
        for block_values, two_pass in [(40 * max(m, n), False), (40 * max(m, n), True)]:
            if m <= n:
                got = methods._left_side_factors(
                    weight, vectors, name, inputs, block_values, two_pass=two_pass
                )
            else:
                got = methods._right_side_factors(weight, vectors, s, name, inputs, block_values)
            _close(got[0], want[0], rtol)
            _close(got[1], want[1], rtol)
        if m <= n:
            one = methods._left_side_factors(weight, vectors, name, inputs, 10**9, two_pass=False)
        else:
            one = methods._right_side_factors(weight, vectors, s, name, inputs, 10**9)
        assert np.array_equal(one[0], want[0]) and np.array_equal(one[1], want[1])


@pytest.mark.parametrize("shape", [(64, 2048), (2048, 64)])
@pytest.mark.parametrize("rank", [8, 60])  # 60 > 2/3 of 64: two passes on the wide side
def test_lowrank_holds_no_float64_copy_of_the_weight(
    shape: tuple[int, int], rank: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Traced peak of ``lowrank`` (vectors already prepared): the factors, a few small-side
    temporaries and a few blocks, never a float64 copy of W (8 bytes x W's size)."""
    block_values = 64 * 128  # 128 columns (rows) per block
    monkeypatch.setattr(methods, "_BLOCK_VALUES", block_values)
    rng = np.random.default_rng(7)
    w = rng.standard_normal(shape).astype(np.float32)
    inputs = _inputs(shape[0], shape[1], 3)
    small, large = min(shape), max(shape)
    one_pass_raw = 8 * rank * large if shape[0] < shape[1] and 3 * rank <= 2 * small else 0
    factors_and_vectors = 4 * rank * (small + large) + 3 * 8 * rank * small + 8 * 8 * large
    bound = factors_and_vectors + one_pass_raw + 4 * 8 * block_values
    assert bound < 8 * w.size  # the bound excludes a float64 copy of W
    for method in ("svd", "whiten", "fwsvd"):
        ready = prepare(w, method, gram=inputs.gram, fisher=inputs.fisher, keep=rank)
        tracemalloc.start()
        try:
            factors = ready.lowrank(w, rank)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < bound, (method, peak, bound)
        want = prepare(w, method, gram=inputs.gram, fisher=inputs.fisher).lowrank(w, rank)
        _close(factors.reconstruct(), want.reconstruct(), 1e-5)


@dataclass(frozen=True, eq=False)
class _Extended(MethodInputs):
    """Inputs with a statistic the blocked products do not know (as a new method might add)."""

    cross: np.ndarray | None = None


def test_unknown_statistics_take_the_whole_matrix_path(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = _inputs(20, 30, 1)
    assert methods._blockable(plain)
    assert methods._blockable(_Extended(gram=plain.gram))
    extended = _Extended(gram=plain.gram, cross=np.eye(20))
    assert not methods._blockable(extended)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("blocked path used for unknown statistics")

    monkeypatch.setattr(methods, "_left_side_factors", refuse)
    w = np.random.default_rng(2).standard_normal((20, 30))
    ready = methods._prepared(w, "whiten", np.ones(20), np.eye(20)[:, :4], extended)
    assert ready.lowrank(w, 4).left.shape == (20, 4)
