"""Joint Q/K/V factorization: grouping, exactness at full rank, the SVD bound, idempotence, stats."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from factorlm.compression import compress
from factorlm.decompose import truncated_svd
from factorlm.passes import (
    JointLinearPass,
    RemoveReplacedWeightsPass,
    analyze,
    joint_statistics,
    member_names,
)
from models import _finish, random_weight, run_ort

D, H = 24, 16  # input width, per-projection output width


def qkv_block(*, seed: int = 3) -> onnx.ModelProto:
    """x feeds three biased MatMuls (Q, K, V) and a fourth MatMul reads Q: only Q/K/V join."""
    names = ("q", "k", "v")
    nodes, inits = [], []
    for i, n in enumerate(names):
        inits.append(numpy_helper.from_array(random_weight(D, H, seed + i), f"{n}.weight"))
        inits.append(numpy_helper.from_array(np.full(H, 0.1 * i, np.float32), f"{n}.bias"))
        nodes.append(
            helper.make_node("MatMul", ["x", f"{n}.weight"], [f"{n}_mm"], name=f"{n}/MatMul")
        )
        nodes.append(helper.make_node("Add", [f"{n}.bias", f"{n}_mm"], [n], name=f"{n}/Add"))
    inits.append(numpy_helper.from_array(random_weight(H, H, seed + 9), "o.weight"))
    nodes.append(helper.make_node("MatMul", ["q", "o.weight"], ["o"], name="o/MatMul"))
    nodes.append(helper.make_node("Concat", ["o", "k", "v"], ["y"], name="concat", axis=-1))
    graph = helper.make_graph(
        nodes,
        "qkv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3 * H])],
        inits,
    )
    return _finish(graph)


def _apply(
    model: onnx.ModelProto, rank: int
) -> tuple[onnx.ModelProto, ir.passes.PassResult, np.ndarray]:
    ir_model = ir.serde.deserialize_model(model)
    cand = next(c for c in analyze(ir_model, joint=True).candidates if c.members)
    low_rank = truncated_svd(cand.matrix().astype(np.float64), rank)
    result = JointLinearPass({cand.name: low_rank})(ir_model)
    RemoveReplacedWeightsPass(cand.members)(ir_model)
    out = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(out, full_check=True)
    return out, result, cand.matrix()


def test_analysis_groups_only_siblings_and_only_when_asked() -> None:
    model = ir.serde.deserialize_model(qkv_block())
    plain = analyze(model)
    assert sorted(c.name for c in plain.candidates) == [
        "k.weight",
        "o.weight",
        "q.weight",
        "v.weight",
    ]
    joint = analyze(model, joint=True)
    names = [c.name for c in joint.candidates]
    assert names == ["q.weight+k.weight+v.weight", "o.weight"]
    cand = joint.candidates[0]
    assert cand.members == ("q.weight", "k.weight", "v.weight")
    assert cand.shape == (D, 3 * H) and cand.kind == "linear"
    np.testing.assert_array_equal(
        cand.matrix(),
        np.concatenate([c.matrix() for c in plain.candidates if c.name != "o.weight"], 1),
    )
    assert member_names(names, joint) == ["q.weight", "k.weight", "v.weight", "o.weight"]


def test_full_rank_is_exact_and_names_are_kept() -> None:
    source = qkv_block()
    out, result, _ = _apply(source, D)
    assert result.modified
    feeds = {"x": np.random.default_rng(0).standard_normal((5, D)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(out, feeds)[0], run_ort(source, feeds)[0], atol=1e-5, rtol=0)
    nodes = {n.name: n for n in out.graph.node}
    assert {"q/MatMul", "k/MatMul", "v/MatMul", "q/Add"} <= set(nodes)
    down = [n for n in out.graph.node if n.name.endswith("/factorlm_joint")]
    assert len(down) == 1 and all(nodes[f"{p}/MatMul"].input[0] == down[0].output[0] for p in "qkv")
    inits = {i.name for i in out.graph.initializer}
    assert not {"q.weight", "k.weight", "v.weight"} & inits and "o.weight" in inits
    assert [o.name for o in out.graph.output] == ["y"]


def test_truncation_meets_the_eckart_young_bound_and_reruns_are_no_ops() -> None:
    source = qkv_block()
    rank = 8
    out, _, matrix = _apply(source, rank)
    x = np.random.default_rng(1).standard_normal((7, D)).astype(np.float32)
    y, y0 = run_ort(out, {"x": x})[0], run_ort(source, {"x": x})[0]
    # Q passes through o.weight; K and V are the raw joint output: check K|V against the bound.
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[rank]
    err = np.linalg.norm(y[:, H:] - y0[:, H:], axis=1)
    assert np.all(err <= sigma * np.linalg.norm(x, axis=1) * (1 + 1e-4) + 1e-5)
    again = ir.serde.deserialize_model(out)
    assert not any(c.members for c in analyze(again, joint=True).candidates)  # factors are tagged
    assert not JointLinearPass({"q.weight+k.weight+v.weight": truncated_svd(matrix, rank)})(
        again
    ).modified


def test_joint_statistics_share_the_input_and_concatenate_fisher() -> None:
    analysis = analyze(ir.serde.deserialize_model(qkv_block()), joint=True)
    gram = np.eye(D)
    stats = types.SimpleNamespace(
        gram={n: gram for n in ("q.weight", "k.weight", "v.weight")},
        mean_abs={"q.weight": np.ones(D)},  # only one member: the joint entry is left out
        fisher={
            n: np.full(H, i, float) for i, n in enumerate(("q.weight", "k.weight", "v.weight"))
        },
        tokens=10,
    )
    joint = joint_statistics(stats, analysis)
    name = "q.weight+k.weight+v.weight"
    assert joint.gram[name] is gram and name not in joint.mean_abs
    np.testing.assert_array_equal(joint.fisher[name], np.repeat([0.0, 1.0, 2.0], H))
    assert name not in stats.gram  # the caller's statistics are not modified
    assert joint_statistics(None, analysis) is None


def test_joint_output_gram_is_the_block_diagonal_of_the_members() -> None:
    """Cross-member blocks Σ g_q g_kᵀ are never collected: zeros, each member's block kept."""
    analysis = analyze(ir.serde.deserialize_model(qkv_block()), joint=True)
    members = ("q.weight", "k.weight", "v.weight")
    rng = np.random.default_rng(7)
    grams = {n: (lambda g: g.T @ g)(rng.standard_normal((30, H))) for n in members}
    stats = types.SimpleNamespace(gram={n: np.eye(D) for n in members}, output_gram=grams)
    joint = joint_statistics(stats, analysis).output_gram["+".join(members)]
    assert joint.shape == (3 * H, 3 * H)
    for i, a in enumerate(members):
        for j, b in enumerate(members):
            block = joint[i * H : (i + 1) * H, j * H : (j + 1) * H]
            np.testing.assert_array_equal(block, grams[a] if a == b else np.zeros((H, H)))


def test_compress_writes_a_joint_plan_that_replays(tmp_path: Path) -> None:
    src = tmp_path / "qkv.onnx"
    onnx.save(qkv_block(), src)
    first = compress(src, tmp_path / "a.onnx", method="svd", ratio=0.8, min_size=0, joint_qkv=True)
    joint = first.plan.weights["q.weight+k.weight+v.weight"]
    m, n = joint.shape
    assert (m, n) == (D, 3 * H) and joint.flops_before == 2 * m * n  # one pass over the matrix
    assert joint.rank is not None and joint.params_after == joint.rank * (m + n)
    assert first.plan_path is not None
    # A plan file with joint keys replays without the flag (the analysis switches to joint).
    again = compress(src, tmp_path / "b.onnx", plan=first.plan_path, min_size=0)
    assert again.plan.weights.keys() == first.plan.weights.keys()
    a = onnx.load(str(tmp_path / "a.onnx"))
    b = onnx.load(str(tmp_path / "b.onnx"))
    feeds = {"x": np.random.default_rng(2).standard_normal((3, D)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(a, feeds)[0], run_ort(b, feeds)[0], atol=1e-5, rtol=0)
