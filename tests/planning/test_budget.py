"""Planning totals span every targeted weight; compress reuses the planner's eigendecompositions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from factorlm.compression import compress
from factorlm.decompose import decompose
from factorlm.passes import analyze
from factorlm.planning import Plan, make_plan, validate_plan
from models import mlp, run_ort


@dataclass
class _Stats:
    gram: dict[str, np.ndarray] = field(default_factory=dict)
    mean_abs: dict[str, np.ndarray] = field(default_factory=dict)
    fisher: dict[str, np.ndarray] = field(default_factory=dict)


def _stats(model: onnx.ModelProto) -> _Stats:
    rng = np.random.default_rng(7)
    stats = _Stats()
    for init in model.graph.initializer:
        if init.name.endswith(".weight"):
            m, n = numpy_helper.to_array(init).shape
            x = rng.standard_normal((4 * m, m)) * rng.uniform(0.2, 2.0, m)
            stats.gram[init.name] = x.T @ x
            stats.mean_abs[init.name] = np.abs(x).mean(axis=0)
            stats.fisher[init.name] = np.asarray(rng.uniform(0.1, 1.0, n))
    return stats


def _model() -> onnx.ModelProto:
    # fc1 32x96 (break-even 24), fc2 96x48 (break-even 32): at 0.55 one of them may stay dense.
    return mlp(32, 96, 48, seed=3, decay=0.05)


@pytest.mark.parametrize("allocation", ["optimal", "lagrangian", "greedy", "uniform"])
@pytest.mark.parametrize("ratio", [0.9, 0.55])
def test_totals_cover_factorized_and_dense_weights(allocation: str, ratio: float) -> None:
    analysis = analyze(ir.from_proto(_model()))
    plan = make_plan(analysis, ratio=ratio, allocation=allocation)
    targeted = {c.name: c.shape[0] * c.shape[1] for c in analysis.candidates}
    assert set(plan.weights) | set(plan.dense) == set(targeted)
    assert not set(plan.weights) & set(plan.dense)
    totals = plan.totals()
    assert totals["params_before"] == sum(targeted.values())
    after = sum(w.params_after for w in plan.weights.values())
    after += sum(targeted[name] for name in plan.dense)
    assert totals["params_after"] == after
    assert totals["params_after"] <= ratio * totals["params_before"]
    assert totals["flops_after"] <= totals["flops_before"]
    again = Plan.from_json(plan.to_json())
    assert again.dense == plan.dense and again.totals() == totals
    assert validate_plan(again, analysis).totals() == totals


def test_a_user_plan_that_factorizes_a_dense_weight_drops_it_from_dense() -> None:
    analysis = analyze(ir.from_proto(_model()))
    plan = make_plan(analysis, ratio=0.9)
    assert plan.dense, "ratio 0.9 leaves a weight dense"
    name = next(iter(plan.dense))
    edited = Plan.from_json(plan.to_json())
    source = make_plan(analysis, ratio=0.5).weights[name]
    edited.weights[name] = source
    checked = validate_plan(edited, analysis)
    assert name not in checked.dense
    assert checked.totals()["params_before"] == plan.totals()["params_before"]


@pytest.mark.parametrize("method", ["svd", "whiten", "asvd", "fwsvd"])
def test_compress_factors_equal_exact_decompose(tmp_path: Path, method: str) -> None:
    """The reused eigendecompositions give the exact-SVD factors of every planned weight."""
    model = _model()
    source = tmp_path / "in.onnx"
    onnx.save(model, source)
    stats = _stats(model) if method != "svd" else None
    result = compress(
        source,
        tmp_path / "out.onnx",
        method=method,
        ratio=0.5,
        min_size=0,
        stats=stats,
        joint_qkv=False,
    )
    assert result.params_after <= 0.5 * result.params_before
    assert result.params_before == 32 * 96 + 96 * 48
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    x = np.random.default_rng(1).standard_normal((2, 5, 32)).astype(np.float32)
    h = x.astype(np.float64)
    for layer in ("fc1", "fc2"):
        name = f"{layer}.weight"
        w = weights[name]
        entry = result.plan.weights.get(name)
        if entry is not None:
            gram = mean_abs = fisher = None
            if stats is not None:
                gram, mean_abs, fisher = stats.gram[name], stats.mean_abs[name], stats.fisher[name]
            assert entry.rank is not None
            w = decompose(
                w,
                method,
                entry.rank,
                gram=gram,
                mean_abs=mean_abs,
                fisher=fisher,
                svd_method="exact",
            ).reconstruct()
        h = h @ w.astype(np.float64) + weights[f"{layer}.bias"]
        if layer == "fc1":
            h = np.maximum(h, 0.0)
    (got,) = run_ort(str(tmp_path / "out.onnx"), {"x": x})
    np.testing.assert_allclose(got, h, rtol=1e-4, atol=1e-4 * np.abs(h).max())


def _qkv_model(d: int = 48, ffn: int = 96) -> onnx.ModelProto:
    """x -> Q, K, V (d x d, biased) -> Add -> O (d x d) -> FFN up (d x ffn) -> down (ffn x d)."""
    from onnx import helper

    from models import random_weight, sequence_model

    nodes, inits = [], []
    for i, n in enumerate(("q", "k", "v")):
        inits.append(
            numpy_helper.from_array(random_weight(d, d, 20 + i, decay=0.05), f"{n}.weight")
        )
        inits.append(numpy_helper.from_array(np.full(d, 0.1 * i, np.float32), f"{n}.bias"))
        nodes.append(
            helper.make_node("MatMul", ["x", f"{n}.weight"], [f"{n}0"], name=f"{n}/MatMul")
        )
        nodes.append(helper.make_node("Add", [f"{n}0", f"{n}.bias"], [n], name=f"{n}/Add"))
    nodes.append(helper.make_node("Sum", ["q", "k", "v"], ["a"], name="mix"))
    chain = [("o", d, d), ("up", d, ffn), ("down", ffn, d)]
    source = "a"
    for i, (n, rows, cols) in enumerate(chain):
        inits.append(
            numpy_helper.from_array(random_weight(rows, cols, 30 + i, decay=0.05), f"{n}.weight")
        )
        nodes.append(helper.make_node("MatMul", [source, f"{n}.weight"], [n], name=f"{n}/MatMul"))
        source = n
    return sequence_model(nodes, inits, name="qkv", d_in=d, d_out=d, output="down")


def _graph_flops(model: onnx.ModelProto) -> int:
    """FLOPs per token of every MatMul by a constant matrix, read off the rewritten graph."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in shapes:
            k, n = shapes[node.input[1]]
            total += 2 * k * n
    return total


@pytest.mark.parametrize("joint", [False, True])
def test_low_rank_flops_are_twice_the_parameters_joint_or_separate(
    tmp_path: Path, joint: bool
) -> None:
    """Every low-rank use computes each stored factor entry once: FLOPs/token = 2·params.

    A joint Q/K/V weight once counted its members' extra uses as embedding lookups, so its
    FLOPs read 2.5x its parameters; the rewritten graph says otherwise.
    """
    model = _qkv_model()
    analysis = analyze(ir.from_proto(model), joint=joint)
    plan = make_plan(analysis, ratio=0.6, rank_multiple=4, min_fraction=0.0)
    assert any("+" in name for name in plan.weights) == joint
    for entry in plan.weights.values():
        assert entry.flops_before == 2 * entry.params_before
        assert entry.flops_after == 2 * entry.params_after
    totals = plan.totals()
    assert totals["flops_before"] == 2 * totals["params_before"]
    assert totals["flops_after"] == 2 * totals["params_after"]
    assert validate_plan(Plan.from_json(plan.to_json()), analysis).totals() == totals

    source = tmp_path / "in.onnx"
    onnx.save(model, source)
    result = compress(
        source,
        tmp_path / "out.onnx",
        ratio=0.6,
        rank_multiple=4,
        min_fraction=0.0,
        min_size=0,
        joint_qkv=joint,
        method="svd",
    )
    assert (result.flops_before, result.flops_after) == (
        totals["flops_before"],
        totals["flops_after"],
    )
    assert _graph_flops(onnx.load(tmp_path / "out.onnx")) == result.flops_after


@pytest.mark.parametrize(
    ("method", "shape"),
    [
        ("svd", "mlp"),
        ("whiten", "mlp"),
        ("asvd", "mlp"),
        ("fwsvd", "mlp"),
        ("whiten", "qkv"),
        # 256 x 512 at ratio 0.3: decompose(svd_method="auto") would take the randomized SVD.
        ("svd", "large"),
        ("whiten", "large"),
    ],
)
def test_compress_with_its_saved_plan_reproduces_the_planless_output(
    tmp_path: Path, method: str, shape: str
) -> None:
    """Replaying OUT.plan.json builds the factors the plan-less run built (one prepared path)."""
    joint = shape == "qkv"
    models = {"mlp": _model, "qkv": _qkv_model, "large": lambda: mlp(256, 512, 256, seed=5)}
    model = models[shape]()
    source = tmp_path / "in.onnx"
    onnx.save(model, source)
    stats = _stats(model) if method != "svd" else None
    first = compress(
        source,
        tmp_path / "a.onnx",
        method=method,
        ratio=0.3 if shape == "large" else 0.5,
        min_size=0,
        stats=stats,
        joint_qkv=joint,
        rank_multiple=4,
    )
    assert first.plan_path is not None and first.factorized
    second = compress(source, tmp_path / "b.onnx", plan=first.plan_path, min_size=0, stats=stats)
    assert second.plan.totals() == first.plan.totals()
    a = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "a.onnx").graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "b.onnx").graph.initializer}
    assert a.keys() == b.keys()
    for name, value in a.items():
        np.testing.assert_allclose(b[name], value, rtol=0, atol=1e-5 * np.abs(value).max())
    width = {"mlp": 32, "qkv": 48, "large": 256}[shape]
    x = np.random.default_rng(4).standard_normal((2, 5, width)).astype(np.float32)
    (got_a,) = run_ort(str(tmp_path / "a.onnx"), {"x": x})
    (got_b,) = run_ort(str(tmp_path / "b.onnx"), {"x": x})
    assert np.linalg.norm(got_b - got_a) <= 1e-5 * np.linalg.norm(got_a)
