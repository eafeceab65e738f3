"""Latency targets for every form: Kronecker, low-rank + sparse and joint Q/K/V use their curves.

Synthetic cost models (no timing), so every check is exact: a plan of each method is priced by
the curves of its own form (a plan priced by another form's curve would leave the weight
dense or predict another number), Kronecker plans keep the target and trade error for latency
like low-rank plans, and a joint group is priced by its joint form unless the engine fuses
Attention.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from factorlm.decompose import kronecker_cost, propose_kronecker_shapes
from factorlm.errors import ConfigError
from factorlm.passes import Analysis, analyze
from factorlm.planning import KRON_SHAPES, LatencyCurve, LatencyModel, make_plan
from factorlm.planning.latency import (
    CurveSpec,
    candidate_spec,
    joint_spec,
    kron_specs,
    kron_term_limit,
    losparse_spec,
    lowrank_spec,
)
from models import _finish, mlp, random_weight

WIDTHS = (32, 16, 16)  # a grouped-query block: Q wider than K and V
D = 48


def _curve(spec: CurveSpec, dense: float, base: float, slope: float) -> LatencyCurve:
    return LatencyCurve(spec.shape, dense, spec.ranks, tuple(base + slope * r for r in spec.ranks))


def _mlp() -> Analysis:
    return analyze(ir.serde.deserialize_model(mlp(128, 256, 128, decay=0.05)), min_size=0)


def _kron_model(fc1_pays: bool = True) -> LatencyModel:
    curves = {}
    for shape, pays in (((128, 256), fc1_pays), ((256, 128), False)):
        for spec in kron_specs(shape, KRON_SHAPES):
            # fc1's Kronecker forms cost 0.2 ms + 0.1 ms a term; fc2's never beat dense.
            curves[spec.key] = _curve(spec, 2.0, 0.2 if pays else 3.0, 0.1 if pays else 0.0)
    return LatencyModel(model_ms=6.0, curves=curves, config={"batch": 1, "seq": 128})


def test_kron_term_limit_and_grid_match_the_kronecker_planner() -> None:
    for shape in [(128, 256), (384, 1536), (96, 40)]:
        m, n = shape
        specs = kron_specs(shape, KRON_SHAPES)
        splits = propose_kronecker_shapes(m, n, limit=KRON_SHAPES, by="flops")
        assert len(specs) <= len(splits) and specs
        for spec in specs:
            a_in, a_out, b_in, b_out = spec.kron or (0, 0, 0, 0)
            most = kron_term_limit(shape, (a_in, a_out), (b_in, b_out))
            params, flops = kronecker_cost((a_in, a_out), (b_in, b_out), most)
            assert params < m * n and flops <= 2 * m * n  # the most terms still pay
            assert spec.ranks[0] == 1 and spec.ranks[-1] == most and len(spec.ranks) <= 4


def test_kron_plan_is_priced_by_its_split_curves() -> None:
    model = _kron_model()
    plan = make_plan(_mlp(), method="kron", latency=model, target_ms=5.0)
    assert plan.latency is not None and plan.latency["predicted_ms"] <= 5.0 + 1e-9
    assert set(plan.weights) == {"fc1.weight"}
    assert "latency plan" in plan.skipped["fc2.weight"]
    entry = plan.weights["fc1.weight"]
    assert entry.method == "kron" and entry.kron is not None
    spec = next(
        s
        for s in kron_specs((128, 256), KRON_SHAPES)
        if list(s.kron or ())[:2] == entry.kron["a_shape"]
    )
    assert entry.predicted_ms == pytest.approx(model.curves[spec.key].at(entry.kron["terms"]))
    assert entry.dense_ms == 2.0 and entry.predicted_ms is not None
    assert plan.latency["predicted_ms"] == pytest.approx(6.0 - 2.0 + entry.predicted_ms)


def test_kron_plan_trades_error_for_latency() -> None:
    errors: list[float] = []
    for target in (4.3, 5.2, 5.9):
        plan = make_plan(
            _mlp(),
            method="kron",
            latency=_kron_model(),
            target_ms=target,
            min_fraction=0.0,
        )
        assert plan.latency is not None and plan.latency["predicted_ms"] <= target + 1e-9
        errors.append(float(plan.weights["fc1.weight"].expected_error or 0.0))
    assert errors[0] >= errors[1] >= errors[2] and errors[0] > errors[2]  # looser: more terms


def test_kron_target_out_of_reach_names_the_fastest_plan() -> None:
    with pytest.raises(ConfigError, match="out of reach"):
        make_plan(_mlp(), method="kron", latency=_kron_model(), target_ms=3.0)


def test_losparse_plan_uses_the_losparse_curve_not_the_low_rank_one() -> None:
    lowrank = {
        s.key: _curve(s, 2.0, 0.05, 0.01)
        for s in (lowrank_spec((128, 256), 8), lowrank_spec((256, 128), 8))
        if s is not None
    }
    only_lowrank = LatencyModel(6.0, lowrank)
    with pytest.raises(ConfigError, match="out of reach"):  # no losparse curve: nothing priced
        make_plan(
            _mlp(),
            method="losparse",
            sparse_density=0.1,
            latency=only_lowrank,
            target_ms=5.9,
        )
    specs = [losparse_spec(s, 8, "column", 0.1) for s in ((128, 256), (256, 128))]
    curves = {s.key: _curve(s, 2.0, 0.5, 0.01) for s in specs if s is not None}
    plan = make_plan(
        _mlp(),
        method="losparse",
        sparse_density=0.1,
        latency=LatencyModel(6.0, curves),
        target_ms=5.0,
    )
    assert plan.latency is not None and plan.latency["predicted_ms"] <= 5.0 + 1e-9
    assert plan.weights
    for name, entry in plan.weights.items():
        assert entry.sparse == {"structure": "column", "density": 0.1}
        key = losparse_spec(entry.shape, 8, "column", 0.1)
        assert key is not None
        assert entry.predicted_ms == pytest.approx(0.5 + 0.01 * int(entry.rank or 0)), name


def _qkv() -> Analysis:
    nodes, inits = [], []
    for i, (name, width) in enumerate(zip("qkv", WIDTHS, strict=True)):
        inits.append(
            numpy_helper.from_array(random_weight(D, width, 3 + i, decay=0.1), f"{name}.w")
        )
        nodes.append(helper.make_node("MatMul", ["x", f"{name}.w"], [name], name=f"{name}/MatMul"))
    nodes.append(helper.make_node("Concat", list("qkv"), ["y"], name="concat", axis=-1))
    graph = helper.make_graph(
        nodes,
        "gqa",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sum(WIDTHS)])],
        inits,
    )
    model: onnx.ModelProto = _finish(graph)
    return analyze(ir.serde.deserialize_model(model), min_size=0, joint=True)


def test_joint_group_is_priced_by_its_joint_curve_unless_attention_is_fused() -> None:
    analysis = _qkv()
    (cand,) = analysis.candidates
    assert cand.members and cand.member_widths == WIDTHS
    joint = joint_spec((D, 64), WIDTHS, 8)
    concatenated = lowrank_spec((D, 64), 8)
    assert joint is not None and concatenated is not None
    assert candidate_spec(cand, "svd", 8) == joint
    assert candidate_spec(cand, "svd", 8, fused=True) == concatenated
    curves = {
        joint.key: _curve(joint, 1.0, 0.1, 0.01),  # a shared left factor: cheap
        concatenated.key: _curve(concatenated, 1.0, 2.0, 0.0),  # never pays
    }
    model = LatencyModel(3.0, curves, {"attention_fused": False})
    plan = make_plan(analysis, method="svd", latency=model, target_ms=2.95)
    rank = int(plan.weights[cand.name].rank or 0)
    assert plan.weights[cand.name].predicted_ms == pytest.approx(0.1 + 0.01 * rank)
    fused = LatencyModel(3.0, curves, {"attention_fused": True})
    with pytest.raises(ConfigError, match="out of reach"):  # the fused pair never pays
        make_plan(analysis, method="svd", latency=fused, target_ms=2.95)
    plan = make_plan(analysis, method="svd", latency=fused, target_ms=3.0)
    assert plan.weights == {} and "latency plan" in plan.skipped[cand.name]


def test_curve_keys_name_every_form_apart() -> None:
    specs = [
        lowrank_spec((128, 256), 8),
        losparse_spec((128, 256), 8, "column", 0.05),
        losparse_spec((128, 256), 8, "2:4", 0.05),
        joint_spec((128, 256), (128, 64, 64), 8),
        *kron_specs((128, 256), KRON_SHAPES),
    ]
    keys = [s.key for s in specs if s is not None]
    assert len(keys) == len(set(keys)) == len(specs)
    assert np.all([k.startswith("128x256") for k in keys])
