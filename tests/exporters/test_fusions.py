"""Fusion counts on protos, onnx_ir models and files, and the fusions a candidate lost."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from factorlm.exporters.fusions import FUSED_OPS, count_fusions, lost_fusions


def fused_graph() -> onnx.ModelProto:
    """A LayerNormalization, a com.microsoft SkipLayerNormalization and one inside an If branch."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    branch = helper.make_graph(
        [helper.make_node("FastGelu", ["x"], ["g"], domain="com.microsoft")],
        "then",
        [],
        [helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 4])],
    )
    nodes = [
        helper.make_node("LayerNormalization", ["x", "s", "b"], ["ln"]),
        helper.make_node(
            "SkipLayerNormalization", ["ln", "x", "s", "b"], ["sk"], domain="com.microsoft"
        ),
        helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
    ]
    graph = helper.make_graph(
        nodes,
        "fused",
        [x, helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [
            helper.make_tensor("s", TensorProto.FLOAT, [4], [1.0] * 4),
            helper.make_tensor("b", TensorProto.FLOAT, [4], [0.0] * 4),
        ],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )


def test_counts_agree_on_proto_ir_and_file(tmp_path: Path) -> None:
    model = fused_graph()
    path = tmp_path / "fused.onnx"
    onnx.save(model, path)
    expected = {"LayerNormalization": 1, "SkipLayerNormalization": 1, "FastGelu": 2}
    for source in (model, ir.serde.deserialize_model(model), path, str(path)):
        counts = count_fusions(source)
        assert {k: v for k, v in counts.items() if v} == expected
        assert set(FUSED_OPS) <= set(counts)  # stable keys, zeros included
    assert "MatMulInteger" not in count_fusions(model, include_quantized=False)


def test_lost_fusions_names_what_the_candidate_misses() -> None:
    reference = {"Attention": 6, "SkipLayerNormalization": 12, "BiasGelu": 6}
    candidate = {"Attention": 0, "SkipLayerNormalization": 12, "BiasGelu": 7}
    assert lost_fusions(reference, candidate) == {"Attention": 6}
    assert lost_fusions(reference, reference) == {}
