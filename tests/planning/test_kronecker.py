"""Kronecker planning: never above dense FLOPs, one global parameter budget, exact rewrites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from factorlm.compression import compress
from factorlm.decompose import kronecker, kronecker_cost, propose_kronecker_shapes
from factorlm.errors import ConfigError
from factorlm.passes import analyze
from factorlm.planning import Plan, make_plan, validate_plan
from models import random_weight, run_ort, sequence_model

D, FFN = 96, 384  # all-MiniLM-L6-v2's layer at a quarter of its width


def _layer() -> onnx.ModelProto:
    """x -> Q, K, V (D x D) -> Sum -> O (D x D) -> up (D x FFN) -> Relu -> down (FFN x D)."""
    nodes, inits = [], []
    for i, n in enumerate(("q", "k", "v")):
        inits.append(numpy_helper.from_array(random_weight(D, D, 40 + i, decay=0.02), f"{n}.w"))
        nodes.append(helper.make_node("MatMul", ["x", f"{n}.w"], [n], name=f"{n}/MatMul"))
    nodes.append(helper.make_node("Sum", ["q", "k", "v"], ["a"], name="mix"))
    for i, (n, rows, cols, source) in enumerate(
        [("o", D, D, "a"), ("up", D, FFN, "o"), ("down", FFN, D, "h")]
    ):
        w = random_weight(rows, cols, 50 + i, decay=0.01)
        inits.append(numpy_helper.from_array(w, f"{n}.w"))
        nodes.append(helper.make_node("MatMul", [source, f"{n}.w"], [n], name=f"{n}/MatMul"))
        if n == "up":
            nodes.append(helper.make_node("Relu", ["up"], ["h"], name="act"))
    return sequence_model(nodes, inits, name="layer", d_in=D, d_out=D, output="down")


def _reference(model: onnx.ModelProto, plan: Plan, x: np.ndarray) -> np.ndarray:
    """The layer in float64 numpy with every planned weight replaced by its Kronecker sum."""
    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    for name, entry in plan.weights.items():
        assert entry.kron is not None
        a_in, a_out = (int(d) for d in entry.kron["a_shape"])
        a_shape = (a_in, a_out)
        factors = kronecker(w[name].astype(np.float32), a_shape, int(entry.kron["terms"]))
        w[name] = factors.reconstruct().astype(np.float64)
    h = x.astype(np.float64)
    a = h @ w["q.w"] + h @ w["k.w"] + h @ w["v.w"]
    return np.maximum(a @ w["o.w"] @ w["up.w"], 0.0) @ w["down.w"]


@pytest.mark.parametrize("ratio", [0.9, 0.75, 0.6, 0.5, 0.3])
def test_kron_plan_never_exceeds_dense_flops_and_meets_the_budget(ratio: float) -> None:
    analysis = analyze(ir.from_proto(_layer()))
    plan = make_plan(analysis, method="kron", ratio=ratio)
    targeted = {c.name: c.shape[0] * c.shape[1] for c in analysis.candidates}
    assert set(plan.weights) | set(plan.dense) == set(targeted)
    assert plan.weights, "some weight is factorized"
    for name, entry in plan.weights.items():
        assert entry.kron is not None
        (a_in, a_out), (b_in, b_out) = entry.kron["a_shape"], entry.kron["b_shape"]
        terms = entry.kron["terms"]
        assert [a_in * b_in, a_out * b_out] == entry.shape
        assert min(a_in, a_out, b_in, b_out) >= 2
        assert entry.flops_after <= entry.flops_before == 2 * targeted[name]
        assert entry.params_after < entry.params_before
        # The split is among the fewest-FLOPs-per-parameter ones the planner examines.
        assert ((a_in, a_out), (b_in, b_out)) in propose_kronecker_shapes(
            *entry.shape, limit=4, by="flops"
        )
        # Its recorded error is the error of the factors compress builds.
        w = analysis.candidate(name).matrix()  # type: ignore[union-attr]
        got = np.linalg.norm(w - kronecker(w, (a_in, a_out), terms).reconstruct())
        assert entry.expected_error == pytest.approx(got / np.linalg.norm(w), rel=1e-4)
    totals = plan.totals()
    assert totals["params_after"] <= ratio * totals["params_before"]
    # The budget is spent: what is left is less than the smallest step of any factorized weight.
    assert totals["params_after"] >= (ratio - 0.08) * totals["params_before"]
    assert totals["flops_after"] <= totals["flops_before"]
    assert validate_plan(Plan.from_json(plan.to_json()), analysis).totals() == totals


def test_low_ratios_cost_less_flops_than_dense() -> None:
    analysis = analyze(ir.from_proto(_layer()))
    totals = make_plan(analysis, method="kron", ratio=0.3).totals()
    assert totals["flops_after"] < totals["flops_before"]
    # At any split, FLOPs as a fraction of dense are at least twice the parameters' fraction.
    assert (
        totals["flops_after"] / totals["flops_before"]
        >= totals["params_after"] / totals["params_before"]
    )


def test_an_infeasible_kron_ratio_is_a_config_error() -> None:
    analysis = analyze(ir.from_proto(_layer()))
    with pytest.raises(ConfigError, match=r"kron.*infeasible"):
        make_plan(analysis, method="kron", ratio=0.001)


@pytest.mark.parametrize("joint_qkv", [False, True])
def test_kron_compress_matches_the_numpy_kronecker_sums_in_ort(
    tmp_path: Path, joint_qkv: bool
) -> None:
    """Joint Q/K/V has no Kronecker form: with joint_qkv the members are planned one by one."""
    model = _layer()
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    result = compress(source, out, method="kron", ratio=0.6, min_size=0, joint_qkv=joint_qkv)
    assert not any("+" in name for name in result.plan.weights)
    assert result.params_after <= 0.6 * result.params_before
    assert result.flops_after <= result.flops_before
    onnx.checker.check_model(onnx.load(out), full_check=True)
    x = np.random.default_rng(3).standard_normal((2, 7, D)).astype(np.float32)
    (got,) = run_ort(str(out), {"x": x})
    ref = _reference(model, result.plan, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_kron_entry_costs_are_those_of_the_rewrite() -> None:
    analysis = analyze(ir.from_proto(_layer()))
    plan = make_plan(analysis, method="kron", ratio=0.6)
    for entry in plan.weights.values():
        assert entry.kron is not None
        a, b = entry.kron["a_shape"], entry.kron["b_shape"]
        assert (entry.params_after, entry.flops_after) == kronecker_cost(
            (a[0], a[1]), (b[0], b[1]), entry.kron["terms"]
        )
