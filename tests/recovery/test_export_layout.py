"""The recovery export's in-place rewrites keep a model's external-data layout (issue 18: the
student's export is on external data above 2 GB, where an inline save fails)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from factorlm.passes.analysis import FACTOR_METADATA_KEY
from factorlm.recovery.export import merge_shared_factors, tag_factors


def _factorized(path: Path, external: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    left = rng.standard_normal((64, 32)).astype(np.float32)
    right = rng.standard_normal((32, 16)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "L"], ["t"]),
            helper.make_node("MatMul", ["t", "R"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        [numpy_helper.from_array(left, "L"), numpy_helper.from_array(right, "R")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, location="model.onnx_data",
            size_threshold=0,
        )  # fmt: skip
    else:
        onnx.save(model, str(path))
    return left, right


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_tagging_keeps_external_data_and_values(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    left, right = _factorized(path, external=True)
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    before = _run(path, x)
    tags = tag_factors(path, {"W": [left, right]})
    assert tags == {"L": "W", "R": "W"}
    header = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in header.graph.initializer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx_data"]
    # the data file holds the two tensors once (not appended to the old bytes)
    assert (tmp_path / "model.onnx_data").stat().st_size == left.nbytes + right.nbytes
    props = {p.key: p.value for p in header.metadata_props}
    assert json.loads(props[FACTOR_METADATA_KEY]) == {"L": "W", "R": "W"}
    np.testing.assert_array_equal(_run(path, x), before)
    assert merge_shared_factors(path) == 0  # nothing to merge: the file is left as it is
    np.testing.assert_array_equal(_run(path, x), before)


def test_inline_model_stays_inline(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    left, right = _factorized(path, external=False)
    tag_factors(path, {"W": [left, right]})
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    header = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == TensorProto.DEFAULT for t in header.graph.initializer)
