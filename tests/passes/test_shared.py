"""MergeSharedMatMulsPass: duplicate ``MatMul(x, L)`` of a trained joint Q/K/V become one."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from factorlm.exporters.fusions import collapse_factor_pairs
from factorlm.passes import FACTOR_METADATA_KEY, MergeSharedMatMulsPass
from models import _finish, random_weight, run_ort

D, R, H = 24, 8, 16


def per_member_down(*, tag: bool = True, plain: bool = False) -> onnx.ModelProto:
    """x feeds three ``MatMul(x, L)`` (as a recovered joint Q/K/V exports), each then ``@ Rᵢ + bᵢ``.

    ``plain`` adds two ``MatMul(x, W)`` with an untagged ``W``: not factors, so never merged.
    """
    inits = [numpy_helper.from_array(random_weight(D, R, 1), "L")]
    nodes, outs = [], []
    for i, n in enumerate(("q", "k", "v")):
        inits.append(numpy_helper.from_array(random_weight(R, H, 2 + i), f"{n}.right"))
        inits.append(numpy_helper.from_array(np.full(H, 0.1 * i, np.float32), f"{n}.bias"))
        nodes += [
            helper.make_node("MatMul", ["x", "L"], [f"t_{n}"], name=f"{n}/down"),
            helper.make_node("MatMul", [f"t_{n}", f"{n}.right"], [f"{n}_mm"], name=f"{n}/up"),
            helper.make_node("Add", [f"{n}_mm", f"{n}.bias"], [n], name=f"{n}/Add"),
        ]
        outs.append(n)
    if plain:
        inits.append(numpy_helper.from_array(random_weight(D, H, 9), "W"))
        nodes += [
            helper.make_node("MatMul", ["x", "W"], ["p1"], name="p1"),
            helper.make_node("MatMul", ["x", "W"], ["p2"], name="p2"),
        ]
        outs += ["p1", "p2"]
    nodes.append(helper.make_node("Concat", outs, ["y"], name="concat", axis=-1))
    graph = helper.make_graph(
        nodes,
        "per_member_down",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", H * len(outs)])],
        inits,
    )
    model = _finish(graph)
    if tag:
        tags = {"L": "q+k+v", "q.right": "q+k+v", "k.right": "q+k+v", "v.right": "q+k+v"}
        helper.set_model_props(
            model, {"author": "tests", FACTOR_METADATA_KEY: json.dumps(tags, sort_keys=True)}
        )
    return model


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((2, 5, D)).astype(np.float32)}


def test_three_down_projections_become_one_and_compute_the_same() -> None:
    proto = per_member_down(plain=True)
    expected = run_ort(proto, _feeds())[0]
    model = ir.serde.deserialize_model(proto)
    result = MergeSharedMatMulsPass()(model)
    assert result.modified
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out, full_check=True)
    names = [n.name for n in out.graph.node]
    assert "q/down" in names and "k/down" not in names and "v/down" not in names
    assert "p1" in names and "p2" in names  # W is not a factor
    ups = [n for n in out.graph.node if n.name.endswith("/up")]
    assert {n.input[0] for n in ups} == {"t_q"}
    assert {p.key: p.value for p in out.metadata_props}[FACTOR_METADATA_KEY]  # tags kept
    np.testing.assert_array_equal(run_ort(out, _feeds())[0], expected)
    # The joint form: the build's collapse now sees one shared down-projection with 3 members.
    collapsed = collapse_factor_pairs(out)
    assert len(collapsed) == 1 and len(collapsed.groups[0].members) == 3
    assert not MergeSharedMatMulsPass()(result.model).modified  # a second run is a no-op


def test_untagged_or_unnamed_weights_are_left_alone() -> None:
    model = ir.serde.deserialize_model(per_member_down(tag=False))
    assert not MergeSharedMatMulsPass()(model).modified
    assert sum(1 for n in model.graph if n.op_type == "MatMul") == 6
    named = MergeSharedMatMulsPass(names=["L"])(model)  # explicit names need no metadata
    assert named.modified
    assert sum(1 for n in model.graph if n.op_type == "MatMul") == 4


def test_a_duplicate_that_is_a_graph_output_keeps_its_name() -> None:
    proto = per_member_down()
    proto.graph.output.append(
        helper.make_tensor_value_info("t_k", TensorProto.FLOAT, ["batch", "seq", R])
    )
    model = ir.serde.deserialize_model(proto)
    assert MergeSharedMatMulsPass()(model).modified  # only v/down goes
    names = {n.name for n in model.graph}
    assert "k/down" in names and "v/down" not in names
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    for got, want in zip(run_ort(out, _feeds()), run_ort(proto, _feeds()), strict=True):
        np.testing.assert_array_equal(got, want)
