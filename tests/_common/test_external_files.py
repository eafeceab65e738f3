"""``external_data_files``: the data files an ONNX model names, found without reading them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from factorlm._common.outputs import external_data_files


def _model(values: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, values.shape[0]])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, values.shape[1]])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [x],
        [y],
        [numpy_helper.from_array(values, "w")],
    )
    return helper.make_model(graph)


def test_external_inline_and_lookalike_models(tmp_path: Path) -> None:
    values = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(
        _model(values), str(external),
        save_as_external_data=True, location="weights.bin", size_threshold=0,
    )  # fmt: skip
    assert external_data_files(external) == [external.parent / "weights.bin"]
    assert external_data_files(external.parent) == [external.parent / "weights.bin"]

    inline = tmp_path / "inline.onnx"
    onnx.save_model(_model(values), str(inline))
    assert b"location" not in inline.read_bytes()  # the fast path: not parsed at all
    assert external_data_files(inline) == []

    # weight bytes that spell "location" send it to the parser, which still finds no file
    tricky = np.frombuffer(b"location" * 128, dtype=np.float32).reshape(16, 16).copy()
    lookalike = tmp_path / "lookalike.onnx"
    onnx.save_model(_model(tricky), str(lookalike))
    assert b"location" in lookalike.read_bytes()
    assert external_data_files(lookalike) == []

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert external_data_files(empty) == []
    assert external_data_files(tmp_path / "missing.onnx") == []
