"""The tiny BERT classifier's linear weights in an ONNX graph, as exporters store them.

Shared by the Fisher tests (both statistics are mapped to ONNX initializers the same way).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def _onnx_of(model_dir: Path, out: Path) -> dict[str, str]:
    """An ONNX graph holding the model's linear weights the way exporters store them.

    Most as transposed ``onnx::MatMul_*`` copies (matched by value), one under its PyTorch name
    in a Gemm with transB=1 (matched by name). Returns ONNX name -> PyTorch name.
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    linear = {
        f"{name}.weight": module.weight.detach().numpy()
        for name, module in model.named_modules()
        if module.__class__.__name__ == "Linear"
    }
    nodes, inits, inputs, outputs, expected = [], [], [], [], {}
    for i, (name, w) in enumerate(sorted(linear.items())):
        x, y = f"x{i}", f"y{i}"
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [None, w.shape[1]]))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [None, w.shape[0]]))
        if i == 0:
            inits.append(numpy_helper.from_array(w, name))
            nodes.append(helper.make_node("Gemm", [x, name], [y], transB=1))
            expected[name] = name
        else:
            init = f"onnx::MatMul_{100 + i}"
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), init))
            nodes.append(helper.make_node("MatMul", [x, init], [y]))
            expected[init] = name
    graph = helper.make_graph(nodes, "weights", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(proto, str(out))
    return expected


@pytest.fixture(scope="session")
def tiny_bert_onnx(
    tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, str]]:
    """``(model.onnx, {ONNX initializer: PyTorch weight name})`` for ``tiny_bert_dir``."""
    path = tmp_path_factory.mktemp("tiny-bert-weights") / "model.onnx"
    return path, _onnx_of(tiny_bert_dir, path)
