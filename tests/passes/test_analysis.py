"""Analysis: which weights are factorizable, in which orientation, and why others are skipped."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import helper

from factorlm.passes import analyze
from models import attention_block, embedding_lm, gemm_model, left_matmul, mlp, quantized_model


def _ir(proto: object) -> ir.Model:
    return ir.serde.deserialize_model(proto)  # type: ignore[arg-type]


def test_matmul_gemm_and_left_orientations() -> None:
    (fc1, fc2) = analyze(_ir(mlp())).candidates
    assert (fc1.name, fc1.shape, fc1.transposed, fc1.uses[0].form) == (
        "fc1.weight",
        (32, 64),
        False,
        "x@W",
    )
    assert fc2.shape == (64, 24)
    (gemm,) = analyze(_ir(gemm_model(trans_b=1))).candidates
    assert (gemm.stored_shape, gemm.shape, gemm.transposed) == ((48, 40), (40, 48), True)
    (gemm0,) = analyze(_ir(gemm_model(trans_b=0))).candidates
    assert (gemm0.shape, gemm0.transposed) == ((40, 48), False)
    (left,) = analyze(_ir(left_matmul())).candidates
    # y = W @ x with W (36, 40): the core sees Wᵀ, in_features 40.
    assert (left.shape, left.transposed, left.uses[0].form) == ((40, 36), True, "W@x")
    assert left.matrix().shape == (40, 36)


def test_tied_embedding_is_one_candidate_with_two_uses() -> None:
    for tie, form in (("transpose", "x@Wt"), ("gemm", "gemm_b")):
        analysis = analyze(_ir(embedding_lm(tie=tie)))
        emb = analysis.candidate("embed.weight")
        assert emb is not None and emb.kind == "embedding"
        assert [u.form for u in emb.uses] == ["gather", form]
        # The core takes the head's orientation: logits = h @ Eᵀ, in = the hidden width.
        assert emb.transposed and emb.shape == (32, 96) and emb.stored_shape == (96, 32)
        assert np.array_equal(emb.matrix(), emb.stored().T)
    untied = analyze(_ir(embedding_lm(tie="none")))
    assert [c.kind for c in untied.candidates] == ["embedding", "linear", "linear"]
    lookup = untied.candidates[0]
    assert not lookup.transposed and lookup.shape == (96, 32)


def test_skip_reasons() -> None:
    analysis = analyze(_ir(quantized_model()), min_size=200)
    reasons = {s.name: s.reason for s in analysis.skipped}
    assert reasons == {
        "wq": "quantized weight (INT8) feeding DequantizeLinear",
        "wi": "quantized weight (INT8) feeding MatMulInteger",
        "w3": "is 3-D [1, 32, 32], not a matrix",
        "small.weight": "has 128 elements, below min_size 200",
    }
    assert analysis.candidates == ()
    shared = analyze(_ir(attention_block()))
    assert shared.skipped[0].reason == "also used by ReduceSum node sum (input 0)"


def test_weight_shared_by_two_matmuls_is_skipped() -> None:
    proto = attention_block()
    graph = proto.graph
    keep = [n for n in graph.node if n.op_type == "MatMul"]
    del graph.node[:]
    graph.node.extend(keep)
    graph.output[0].name = "b"
    (skipped,) = analyze(_ir(proto)).skipped
    assert skipped.reason.startswith("shared by 2 linear nodes (a/MatMul, b/MatMul)")


def test_graph_input_initializer_and_non_float_are_skipped() -> None:
    proto = mlp()
    proto.graph.input.append(helper.make_tensor_value_info("fc2.weight", 1, [64, 24]))
    analysis = analyze(_ir(proto))
    assert [c.name for c in analysis.candidates] == ["fc1.weight"]
    assert (
        analysis.skipped[0].reason == "is also a graph input, so it can be overridden at run time"
    )
