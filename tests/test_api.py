"""The Python API mirrors the CLI: factorlm.export/compress/build/benchmark/run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import factorlm
from factorlm.errors import ConfigError


def _mlp(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 96])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def test_verbs_are_callable_and_mirror_the_cli(tmp_path: Path) -> None:
    source = _mlp(tmp_path / "mlp.onnx")
    result = factorlm.compress(
        source, tmp_path / "out" / "model.onnx", method="svd", ratio=0.5, min_size=1
    )
    assert result.factorized == 1
    manifest = factorlm.build(tmp_path / "out" / "model.onnx", tmp_path / "engine", optimize=False)
    assert (tmp_path / "engine" / manifest.engine).is_file()
    report = factorlm.benchmark(
        source, [tmp_path / "engine"], shapes=["2x8"], warmup=1, iterations=3
    )
    assert report.data["latency"]
    assert callable(factorlm.export) and callable(factorlm.run)


def test_unknown_backend_and_bad_config_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Unknown backend"):
        factorlm.build(tmp_path / "m.onnx", tmp_path / "e", backend="tvm")
    with pytest.raises(ConfigError, match="did you mean 'compress'"):
        factorlm.run({"compres": {}})
