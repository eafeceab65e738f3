"""TensorRT: the plan (profiles, flags, calibration, timing cache) is decided without TensorRT.

The engine tests at the bottom need the ``tensorrt`` package and a CUDA GPU and skip otherwise;
everything else runs everywhere.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from factorlm.errors import BackendUnavailableError, ConfigError, DataError
from factorlm.exporters.shapes import derive_shapes, model_inputs, parse_shapes
from factorlm.exporters.tensorrt import (
    TENSORRT_MISSING,
    build_trt_engine,
    builder_flags,
    has_explicit_quantization,
    load_calibration,
    plan_trt_build,
)
from models import mlp, run_ort

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def qdq_model() -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul W: explicit INT8 for TensorRT."""
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
            helper.make_node("MatMul", ["d", "w"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [
            numpy_helper.from_array(np.array(0.05, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
            numpy_helper.from_array(w, "w"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), path)
    return path


def test_builder_flags_follow_the_options() -> None:
    assert builder_flags() == []
    assert builder_flags(fp16=True, bf16=True, sparse=True) == ["FP16", "BF16", "SPARSE_WEIGHTS"]
    assert builder_flags(int8=True, explicit_quantization=True) == ["INT8"]
    assert builder_flags(int8=True, fp16=True, calibration=True) == ["FP16", "INT8"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"int8": True}, "needs a model with Q/DQ nodes or a calibration set"),
        ({"calibration": True}, "without --int8"),
        ({"int8": True, "explicit_quantization": True, "calibration": True}, "already has Q/DQ"),
    ],
)
def test_impossible_int8_requests_are_refused(kwargs: dict[str, bool], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        builder_flags(**kwargs)


def test_explicit_quantization_is_detected() -> None:
    assert has_explicit_quantization(qdq_model())
    assert not has_explicit_quantization(mlp())


def test_plan_derives_a_profile_from_the_dynamic_axes(mlp_path: Path, tmp_path: Path) -> None:
    plan, header, batches = plan_trt_build(mlp_path, fp16=True, timing_cache=tmp_path / "t.cache")
    assert plan.profile["x"].to_spec() == "x:1x1x32,8x128x32,32x512x32"
    assert plan.flags == ("FP16",) and batches == [] and header.graph.name == "mlp"
    extra = plan.to_json()
    assert extra["shapes"] == "x:1x1x32,8x128x32,32x512x32"
    assert extra["timing_cache"] == str(tmp_path / "t.cache") and extra["int8_source"] is None
    given, _, _ = plan_trt_build(mlp_path, shapes="x:1x16x32,4x64x32,8x256x32", timing_cache=False)
    assert given.profile["x"].opt == (4, 64, 32) and given.timing_cache is None
    default, _, _ = plan_trt_build(mlp_path)
    assert default.timing_cache is not None and default.timing_cache.name == "timing.cache"


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"shapes": "x:1x16,8x128,32x512"}, ConfigError, "rank 2 but the model's input has rank 3"),
        ({"shapes": "ids:1x1x32,1x1x32,1x1x32"}, ConfigError, "does not have"),
        ({"shapes": "x:1x1x16,1x1x16,1x1x16"}, ConfigError, "fixed to 32"),
        ({"shapes": "x:1x1x32;8x128x32"}, ConfigError, "Malformed shapes entry"),
        ({"workspace_gib": 0}, ConfigError, "Workspace must be a positive"),
        ({"optimization_level": 9}, ConfigError, "between 0 and 5"),
        ({"int8": True}, ConfigError, "calibration set"),
    ],
)
def test_bad_trt_requests_fail_before_tensorrt_is_needed(
    mlp_path: Path, tmp_path: Path, kwargs: dict[str, object], error: type[Exception], needle: str
) -> None:
    out = tmp_path / "engine"
    with pytest.raises(error, match=needle):
        build_trt_engine(mlp_path, out, **kwargs)  # type: ignore[arg-type]
    assert not out.exists()


def test_calibration_sets_are_checked_and_batched(mlp_path: Path, tmp_path: Path) -> None:
    inputs = model_inputs(mlp())
    profile = derive_shapes(inputs, parse_shapes("x:1x4x32,4x16x32,4x64x32"))
    good = tmp_path / "calib.npz"
    np.savez(good, x=np.zeros((10, 16, 32), np.float32))
    batches = load_calibration(good, inputs, profile, batch_size=8)
    assert [b["x"].shape for b in batches] == [(4, 16, 32), (4, 16, 32)]  # capped by max batch
    plan, _, got = plan_trt_build(
        mlp_path, shapes=profile, int8=True, calibration=good, timing_cache=False
    )
    assert plan.flags == ("INT8",) and len(got) == 2  # default batch 8, capped by max batch 4
    assert plan.to_json()["int8_source"] == "calibration"
    bad = {
        "wrong_name.npz": (
            {"y": np.zeros((4, 16, 32), np.float32)},
            "lacks an array for input 'x'",
        ),
        "wrong_dtype.npz": ({"x": np.zeros((4, 16, 32), np.int64)}, "is int64"),
        "wrong_rank.npz": ({"x": np.zeros((4, 32), np.float32)}, "has rank 2"),
        "too_long.npz": ({"x": np.zeros((4, 128, 32), np.float32)}, "outside the profile"),
    }
    for name, (arrays, needle) in bad.items():
        np.savez(tmp_path / name, **arrays)  # type: ignore[arg-type]
        with pytest.raises(DataError, match=needle):
            load_calibration(tmp_path / name, inputs, profile)
    with pytest.raises(DataError, match="does not exist"):
        load_calibration(tmp_path / "missing.npz", inputs, profile)


def test_qdq_model_builds_int8_without_calibration(tmp_path: Path) -> None:
    path = tmp_path / "qdq.onnx"
    onnx.save(qdq_model(), path)
    plan, _, _ = plan_trt_build(path, int8=True, timing_cache=False)
    assert plan.flags == ("INT8",) and plan.to_json()["int8_source"] == "explicit Q/DQ"


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is absent")
def test_missing_tensorrt_is_one_sentence_and_nothing_is_written(
    mlp_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "engine"
    with pytest.raises(BackendUnavailableError) as info:
        build_trt_engine(mlp_path, out, fp16=True, timing_cache=False)
    assert str(info.value) == TENSORRT_MISSING
    assert (
        TENSORRT_MISSING
        == "TensorRT is not installed; install the extra with `pip install factorlm[tensorrt]`."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


# ----------------------------------------------------------------------------------------------
# Real engines: need tensorrt and a CUDA device.


def _run_plan(plan_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Deserialize a plan and run it once with torch-owned CUDA buffers (TensorRT 10 I/O API)."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    context = engine.create_execution_context()
    buffers: dict[str, torch.Tensor] = {}
    for name, array in feeds.items():
        buffers[name] = torch.from_numpy(array).cuda()
        context.set_input_shape(name, tuple(array.shape))
        context.set_tensor_address(name, buffers[name].data_ptr())
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return {name: t.cpu().numpy() for name, t in outputs.items()}


@pytest.mark.tensorrt
def test_tensorrt_engine_matches_onnx_runtime(mlp_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA device")
    cache = tmp_path / "timing.cache"
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 16, 32)).astype(np.float32)}
    reference = run_ort(mlp(), feeds)[0]
    for precision, atol in (("fp32", 1e-4), ("fp16", 2e-2)):
        out = tmp_path / precision
        manifest = build_trt_engine(
            mlp_path,
            out,
            shapes="x:1x1x32,4x16x32,8x64x32",
            fp16=precision == "fp16",
            timing_cache=cache,
        )
        assert manifest.backend == "tensorrt" and (out / "model.plan").is_file()
        assert manifest.extra["profile"]["x"]["max"] == [8, 64, 32]
        got = _run_plan(out / "model.plan", feeds)["y"]
        np.testing.assert_allclose(got, reference, atol=atol)
        assert cache.is_file() and cache.stat().st_size > 0  # reused by the second build
