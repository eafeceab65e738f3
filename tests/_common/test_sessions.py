"""The one ORT session factory: a real tiny model runs, settings are honoured, errors are short."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from factorlm._common.sessions import (
    create_session,
    graph_level,
    resolve_providers,
    session_options,
)
from factorlm.errors import BackendUnavailableError, ConfigError, ModelLoadError

WEIGHT = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def tiny_model() -> onnx.ModelProto:
    """``y = relu(x @ W)`` with a constant 4x3 weight: small, but a real graph ORT optimizes."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(WEIGHT, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), path)
    return path


def test_a_session_from_a_file_or_bytes_computes_the_graph(model_path: Path) -> None:
    x = np.array([[1, -2, 3, -4], [0.5, 0.5, 0.5, 0.5]], dtype=np.float32)
    expected = np.maximum(x @ WEIGHT, 0)
    for source in (model_path, str(model_path), tiny_model().SerializeToString()):
        session = create_session(source)
        assert session.get_providers() == ["CPUExecutionProvider"]
        np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-6)


def test_threads_level_and_spinning_are_honoured(model_path: Path, tmp_path: Path) -> None:
    options = session_options(
        graph_optimization_level="basic",
        intra_op_num_threads=3,
        inter_op_num_threads=2,
        allow_spinning=False,
    )
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    session = create_session(model_path, intra_op_num_threads=2, graph_optimization_level="all")
    assert session.get_session_options().intra_op_num_threads == 2
    assert (
        session.get_session_options().graph_optimization_level
        == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    optimized = tmp_path / "optimized.onnx"
    create_session(
        model_path, graph_optimization_level="extended", optimized_model_filepath=optimized
    )
    assert (
        onnx.load(str(optimized)).graph.output[0].name == "y"
    )  # saved offline, as the builder does


def test_graph_levels_accept_short_and_full_names() -> None:
    assert graph_level("all") == graph_level("ORT_ENABLE_ALL") == "ORT_ENABLE_ALL"
    assert graph_level("disable") == graph_level("disable_all") == "ORT_DISABLE_ALL"
    with pytest.raises(ConfigError, match="'turbo' is not one of"):
        graph_level("turbo")
    with pytest.raises(ConfigError, match="Thread counts"):
        session_options(intra_op_num_threads=-1)


def test_providers_resolve_aliases_and_keep_cpu_last() -> None:
    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers(["CPUExecutionProvider", "cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers(" cpu , ") == ["CPUExecutionProvider"]


def test_an_unknown_provider_is_one_sentence(model_path: Path) -> None:
    with pytest.raises(
        BackendUnavailableError, match="'NoSuchExecutionProvider' is not available"
    ) as info:
        create_session(model_path, providers=["NoSuchExecutionProvider"])
    message = str(info.value)
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert "CPUExecutionProvider" in message  # it names what is available
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailableError, match=r"factorlm\[gpu\]"):
            create_session(model_path, providers="cuda")


def test_a_model_ort_cannot_load_is_a_model_load_error(tmp_path: Path) -> None:
    model = tiny_model()
    model.graph.node[1].op_type = "NoSuchOp"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match=r"ONNX Runtime could not load .*broken\.onnx") as info:
        create_session(path)
    assert "\n" not in str(info.value)
