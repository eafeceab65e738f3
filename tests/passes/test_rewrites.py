"""Rewrite passes: exact at full rank, equal to the numpy reconstruction when lossy, idempotent.

Every output is serialized, passes the full ONNX checker (with strict shape inference) and runs in
ONNX Runtime; graph inputs/outputs, opset and metadata are those of the input model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from factorlm.decompose import LowRank, truncated_svd
from factorlm.decompose.kronecker import kronecker
from factorlm.decompose.sparse import lowrank_plus_sparse
from factorlm.passes import (
    KroneckerPass,
    LowRankEmbeddingPass,
    LowRankLinearPass,
    LowRankSparsePass,
    RemoveReplacedWeightsPass,
    analyze,
)
from models import embedding_lm, gemm_model, left_matmul, mlp, run_ort

RNG = np.random.default_rng(0)
FEEDS: dict[str, Callable[[], dict[str, np.ndarray]]] = {
    "mlp": lambda: {"x": RNG.standard_normal((2, 5, 32)).astype(np.float32)},
    "gemm_t": lambda: {"x": RNG.standard_normal((6, 40)).astype(np.float32)},
    "gemm": lambda: {"x": RNG.standard_normal((6, 40)).astype(np.float32)},
    "left": lambda: {"x": RNG.standard_normal((40, 7)).astype(np.float32)},
    "tied": lambda: {"ids": RNG.integers(0, 96, (2, 5))},
    "tied_gemm": lambda: {"ids": RNG.integers(0, 96, (2, 5))},
}
BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp": mlp,
    "gemm_t": lambda: gemm_model(trans_b=1),
    "gemm": lambda: gemm_model(trans_b=0),
    "left": left_matmul,
    "tied": embedding_lm,
    "tied_gemm": lambda: embedding_lm(tie="gemm"),
}


def _compress(
    proto: onnx.ModelProto, rank_of: Callable[[tuple[int, int]], int]
) -> tuple[onnx.ModelProto, dict[str, LowRank], bool]:
    model = ir.serde.deserialize_model(proto)
    factors = {
        c.name: truncated_svd(c.matrix(), rank_of(c.shape)) for c in analyze(model).candidates
    }
    result = ir.passes.PassManager(
        [
            LowRankLinearPass(factors),
            LowRankEmbeddingPass(factors),
            RemoveReplacedWeightsPass(factors),
        ],
        steps=1,
    )(model)
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    return out, factors, result.modified


def _with_weights(proto: onnx.ModelProto, stored: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The original graph with some initializers replaced (the numpy reconstruction)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for init in copy.graph.initializer:
        if init.name in stored:
            init.CopyFrom(numpy_helper.from_array(stored[init.name].astype(np.float32), init.name))
    return copy


def _assert_interface_preserved(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    assert after.graph.input == before.graph.input
    assert after.graph.output == before.graph.output
    assert after.opset_import == before.opset_import
    assert after.ir_version == before.ir_version
    meta = {p.key: p.value for p in after.metadata_props}
    assert {k: meta[k] for k in ("author", "purpose")} == {
        "author": "tests",
        "purpose": "factorization",
    }
    assert after.doc_string == before.doc_string


@pytest.mark.parametrize("case", sorted(BUILDERS))
def test_full_rank_is_exact(case: str) -> None:
    proto = BUILDERS[case]()
    out, factors, modified = _compress(proto, min)
    assert modified and factors
    _assert_interface_preserved(proto, out)
    feeds = FEEDS[case]()
    ref = run_ort(proto, feeds)[0]
    got = run_ort(out, feeds)[0]
    assert np.linalg.norm(got - ref) <= 1e-4 * np.linalg.norm(ref)
    # The dense originals are gone and a second run finds nothing new to factorize.
    names = {i.name for i in out.graph.initializer}
    assert not names & set(factors)
    again = analyze(ir.serde.deserialize_model(out))
    assert again.candidates == ()
    assert all("already a factor" in s.reason for s in again.skipped)


@pytest.mark.parametrize("case", sorted(BUILDERS))
def test_lossy_matches_numpy_reconstruction(case: str) -> None:
    proto = BUILDERS[case]()
    out, factors, _ = _compress(proto, lambda shape: max(1, min(shape) // 4))
    stored: dict[str, np.ndarray] = {}
    for cand in analyze(ir.serde.deserialize_model(proto)).candidates:
        approx = factors[cand.name].reconstruct()
        stored[cand.name] = approx.T if cand.transposed else approx
    feeds = FEEDS[case]()
    expected = run_ort(_with_weights(proto, stored), feeds)[0]
    got = run_ort(out, feeds)[0]
    original = run_ort(proto, feeds)[0]
    scale = np.linalg.norm(expected)
    assert np.linalg.norm(got - expected) <= 2e-5 * scale
    assert np.linalg.norm(original - expected) > 1e-2 * scale  # the rank cut is really lossy


def test_second_pass_run_is_a_noop() -> None:
    out, factors, _ = _compress(mlp(), min)
    model = ir.serde.deserialize_model(out)
    result = LowRankLinearPass(factors)(model)
    assert not result.modified
    assert ir.serde.serialize_model(model) == out


@pytest.mark.parametrize(("terms", "x_shape"), [(1, (2, 3, 32)), (3, (4, 32)), (2, (32,))])
def test_kronecker_matches_dense_sum(terms: int, x_shape: tuple[int, ...]) -> None:
    proto = mlp(32, 64, 24)
    model = ir.serde.deserialize_model(proto)
    shapes = {"fc1.weight": (4, 8), "fc2.weight": (8, 4)}
    factors = {
        n: kronecker(c.matrix(), shapes[n], terms)
        for n in shapes
        if (c := analyze(model).candidate(n))
    }
    assert KroneckerPass(factors)(model).modified
    RemoveReplacedWeightsPass(factors)(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    dense = {
        n: sum(np.kron(kf.a[i].astype(np.float64), kf.b[i]) for i in range(kf.a.shape[0]))
        for n, kf in factors.items()
    }
    # Dynamic leading dims: the graph input is (batch, seq, 32); feed any leading layout.
    proto_any = _relax_input(proto)
    out_any = _relax_input(out)
    x = RNG.standard_normal(x_shape).astype(np.float32)
    expected = run_ort(_with_weights(proto_any, dense), {"x": x})[0]  # type: ignore[arg-type]
    got = run_ort(out_any, {"x": x})[0]
    assert got.shape == expected.shape == (*x_shape[:-1], 24)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def _relax_input(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for value in (copy.graph.input[0], copy.graph.output[0]):
        value.type.tensor_type.ClearField("shape")
    return copy


@pytest.mark.parametrize("structure", ["column", "unstructured", "2:4"])
def test_lowrank_sparse_matches_reconstruction(structure: str) -> None:
    proto = mlp(32, 64, 24)
    model = ir.serde.deserialize_model(proto)
    density = 0.5 if structure == "2:4" else 0.25
    factors = {
        c.name: lowrank_plus_sparse(c.matrix(), 4, density, structure)  # type: ignore[arg-type]
        for c in analyze(model).candidates
    }
    assert LowRankSparsePass(factors)(model).modified
    RemoveReplacedWeightsPass(factors)(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    _assert_interface_preserved(proto, out)
    dense = {}
    for name, f in factors.items():
        sparse = np.zeros(f.low_rank.shape)
        if structure == "column":
            assert f.rows is not None and f.values is not None
            sparse[f.rows] = f.values
        else:
            sparse = f.residual.astype(np.float64)
        dense[name] = f.low_rank.reconstruct().astype(np.float64) + sparse
    x = RNG.standard_normal((2, 5, 32)).astype(np.float32)
    expected = run_ort(_with_weights(proto, dense), {"x": x})[0]
    got = run_ort(out, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    assert analyze(ir.serde.deserialize_model(out)).candidates == ()
