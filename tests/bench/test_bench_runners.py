"""Runners and synthetic feeds: one protocol, model folders, engine manifests, KV-cache inputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from bench_models import VOCAB, bigram_lm, encoder_weights

from factorlm.bench.feeds import Shape, default_shapes, make_feeds, parse_shapes, vocab_size_of
from factorlm.bench.runners import OrtRunner, Runner, TrtRunner, load_runner, resolve_model
from factorlm.errors import BackendUnavailableError, ConfigError, ModelLoadError


def test_ort_runner_matches_numpy_and_records_settings(models: dict[str, Path]) -> None:
    runner = load_runner(models["ref"], intra_op_threads=1)
    with runner as active:
        assert isinstance(active, Runner)
        assert [m.name for m in active.inputs] == ["input_ids", "attention_mask"]
        assert active.outputs[0].shape == ("batch", "sequence", 16)
        ids = np.array([[3, 5, 7]], np.int64)
        mask = np.array([[1, 1, 0]], np.int64)
        out = active.infer({"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
        assert active.last_inference_time is not None and active.last_inference_time > 0
        table, weight = encoder_weights()
        expected = (table[ids] @ weight) * mask[..., None]
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
        session = active.describe()["session"]
    assert session == {
        "providers": ["CPUExecutionProvider"],
        "intra_op_threads": 1,
        "inter_op_threads": 0,
        "graph_optimization_level": "all",
        "allow_spinning": False,
    }
    assert runner.name == "ref"


def test_engine_folder_with_manifest_picks_the_named_engine(
    models: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "engine"
    folder.mkdir()
    (folder / "optimized.onnx").write_bytes((models["ref"] / "model.onnx").read_bytes())
    (folder / "manifest.json").write_text(
        json.dumps({"backend": "ort", "engine": "optimized.onnx"})
    )
    resolved = resolve_model(folder)
    assert resolved.file == folder / "optimized.onnx" and resolved.backend == "onnxruntime"
    assert resolved.manifest == {"backend": "ort", "engine": "optimized.onnx"}
    with load_runner(folder) as runner:
        assert runner.manifest is not None and runner.name == "engine"


def test_bad_model_paths_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(tmp_path / "missing.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no"):
        resolve_model(tmp_path / "empty")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=r"bad\.onnx"), OrtRunner(bad):
        pass
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{")
    with pytest.raises(ModelLoadError, match="manifest"):
        resolve_model(broken)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed"
)
def test_trt_runner_without_tensorrt_is_one_clear_error(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0")
    runner = load_runner(tmp_path)
    assert isinstance(runner, TrtRunner)
    with pytest.raises(BackendUnavailableError, match="TensorRT"), runner:
        pass


@pytest.mark.tensorrt
def test_trt_runner_matches_onnxruntime(models: dict[str, Path], tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((models["ref"] / "model.onnx").read_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name in ("input_ids", "attention_mask"):
        profile.set_shape(name, (1, 1), (2, 8), (4, 32))
    config.add_optimization_profile(profile)
    plan = tmp_path / "model.plan"
    plan.write_bytes(bytes(builder.build_serialized_network(network, config)))
    feeds = {
        "input_ids": np.array([[3, 5, 7]], np.int64),
        "attention_mask": np.ones((1, 3), np.int64),
    }
    with TrtRunner(plan) as trt_runner, OrtRunner(models["ref"] / "model.onnx") as ort_runner:
        assert {m.name for m in trt_runner.inputs} == {"input_ids", "attention_mask"}
        np.testing.assert_allclose(
            trt_runner.infer(feeds)["last_hidden_state"],
            ort_runner.infer(feeds)["last_hidden_state"],
            rtol=1e-3,
            atol=1e-3,
        )


def test_shapes_parse_and_default_from_axes(models: dict[str, Path]) -> None:
    assert parse_shapes(["1x128,8x128", "1X128"]) == [Shape(1, 128), Shape(8, 128)]
    for bad in ("8", "0x128", "axb", "8x"):
        with pytest.raises(ConfigError, match="BATCHxSEQUENCE"):
            parse_shapes([bad])
    with load_runner(models["ref"]) as runner:
        assert default_shapes(runner.inputs) == [Shape(1, 128), Shape(8, 128)]
    assert vocab_size_of(models["ref"] / "model.onnx") == VOCAB


def test_feeds_for_a_decoder_with_kv_cache(tmp_path: Path) -> None:
    path = bigram_lm(tmp_path / "lm.onnx", with_past=True)
    with OrtRunner(path) as runner:
        feeds = make_feeds(
            runner.inputs, Shape(2, 5), rng=np.random.default_rng(0), vocab_size=VOCAB
        )
        assert feeds["input_ids"].shape == (2, 5) and feeds["input_ids"].max() < VOCAB
        assert feeds["attention_mask"].shape == (2, 5) and feeds["attention_mask"].all()
        assert feeds["past_key_values.0.key"].shape == (2, 2, 0, 8)
        out = runner.infer(feeds)
    assert out["present.0.key"].shape == (2, 2, 5, 8)
    direct = ort.InferenceSession(str(path)).run(None, feeds)
    np.testing.assert_array_equal(out["logits"], direct[0])


def test_engine_folder_from_factorlm_build(models: dict[str, Path], tmp_path: Path) -> None:
    from factorlm.exporters.ort import build_ort_engine

    build_ort_engine(models["ref"] / "model.onnx", tmp_path / "engine", format="ort")
    resolved = resolve_model(tmp_path / "engine")
    assert resolved.manifest is not None and resolved.file.suffix == ".ort"
    feeds = {"input_ids": np.array([[3, 5]], np.int64), "attention_mask": np.ones((1, 2), np.int64)}
    with load_runner(tmp_path / "engine") as engine, load_runner(models["ref"]) as source:
        np.testing.assert_allclose(
            engine.infer(feeds)["last_hidden_state"],
            source.infer(feeds)["last_hidden_state"],
            rtol=1e-5,
            atol=1e-6,
        )
