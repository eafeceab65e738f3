"""A tiny transformer-like block saved twice: weights inline, and as external data (threshold 0).

It exercises every weight form the streaming path must carry: a token embedding tied to the LM
head through a Transpose, Q/K/V siblings (one joint candidate), a Gemm with transB=1 (the core
reads the stored weight transposed) and an up/down MLP.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from factorlm.calibration import CalibrationStats
from models import _finish, random_weight

VOCAB, D, FF = 64, 32, 64
WEIGHTS = {
    "embed.weight": (VOCAB, D),
    "q.weight": (D, D),
    "k.weight": (D, D),
    "v.weight": (D, D),
    "o.weight": (D, D),  # stored (out, in): Gemm transB=1
    "up.weight": (D, FF),
    "down.weight": (FF, D),
}
#: The input features of each linear weight's core matrix (for the synthetic Grams).
INPUTS = {
    "q.weight": D,
    "k.weight": D,
    "v.weight": D,
    "o.weight": D,
    "up.weight": D,
    "down.weight": FF,
}


def block_lm(seed: int = 0) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(random_weight(*shape, seed + i, decay=0.05), name)
        for i, (name, shape) in enumerate(WEIGHTS.items())
    ]
    inits.append(numpy_helper.from_array(np.array([-1, D], np.int64), "flat"))
    nodes = [
        helper.make_node("Gather", ["embed.weight", "ids"], ["x"], name="embed/Gather"),
        helper.make_node("MatMul", ["x", "q.weight"], ["q"], name="q/MatMul"),
        helper.make_node("MatMul", ["x", "k.weight"], ["k"], name="k/MatMul"),
        helper.make_node("MatMul", ["x", "v.weight"], ["v"], name="v/MatMul"),
        helper.make_node("Add", ["q", "k"], ["qk"], name="qk"),
        helper.make_node("Add", ["qk", "v"], ["qkv"], name="qkv"),
        helper.make_node("Shape", ["x"], ["xs"], name="xs"),
        helper.make_node("Reshape", ["qkv", "flat"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "o.weight"], ["g"], name="o/Gemm", transB=1),
        helper.make_node("Reshape", ["g", "xs"], ["h"], name="unflatten"),
        helper.make_node("MatMul", ["h", "up.weight"], ["u"], name="up/MatMul"),
        helper.make_node("Relu", ["u"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "down.weight"], ["dn"], name="down/MatMul"),
        helper.make_node("Transpose", ["embed.weight"], ["et"], name="head/T", perm=[1, 0]),
        helper.make_node("MatMul", ["dn", "et"], ["logits"], name="head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        inits,
    )
    return _finish(graph)


@pytest.fixture()
def block_models(tmp_path: Path) -> tuple[Path, Path]:
    """``(inline, external)``: the same block saved with embedded weights and with every
    initializer in ``weights.bin`` (threshold 0)."""
    inline = tmp_path / "inline" / "model.onnx"
    inline.parent.mkdir()
    onnx.save_model(block_lm(), str(inline))
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    model = block_lm()
    external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    onnx.save_model(model, str(external))
    return inline, external


@pytest.fixture()
def block_stats() -> CalibrationStats:
    """Synthetic, well-conditioned Grams (and mean |x|) for every linear weight."""
    rng = np.random.default_rng(5)
    gram, mean_abs = {}, {}
    for name, n in INPUTS.items():
        x = rng.standard_normal((4 * n, n)) * np.linspace(0.2, 2.0, n)
        gram[name] = x.T @ x
        mean_abs[name] = np.abs(x).mean(axis=0)
    return CalibrationStats(gram=gram, mean_abs=mean_abs, tokens=4 * FF)
