"""ONNX Runtime engine builds reproduce their source model and fail without leftovers.

fp32 engines must match the source within 1e-4 (absolute, on outputs of order 1); fp16 and int8
engines are lossy, so their cosine similarity to the source is measured, printed and bounded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from factorlm.errors import BackendUnavailableError, ConfigError, FactorlmError, ModelLoadError
from factorlm.exporters.ort import build_ort_engine
from models import mlp, run_ort

from ..engine_models import bert_feeds, cosine, leftovers, run_engine

FP32_ATOL = 1e-4


@pytest.mark.parametrize(
    ("options", "engine"),
    [
        ({"optimize": False}, "model.onnx"),
        ({}, "model.onnx"),
        ({"format": "ort"}, "model.ort"),
    ],
)
def test_fp32_engines_of_a_plain_graph_match_the_source(
    mlp_path: Path, tmp_path: Path, options: dict[str, object], engine: str
) -> None:
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)}
    out = tmp_path / "engine"
    manifest = build_ort_engine(mlp_path, out, **options)  # type: ignore[arg-type]
    assert manifest.engine == engine and (out / engine).is_file()
    assert manifest.model_type is None  # no config, not a transformer: plain graph optimization
    assert manifest.options["optimizer"] == (
        "none" if options.get("optimize") is False else "graph"
    )
    np.testing.assert_allclose(run_engine(out, feeds)[0], run_ort(mlp(), feeds)[0], atol=FP32_ATOL)
    assert leftovers(tmp_path) == []


def test_fp16_keeps_io_types_and_blocks_overflow_prone_ops(mlp_path: Path, tmp_path: Path) -> None:
    manifest = build_ort_engine(mlp_path, tmp_path / "fp16", fp16=True)
    engine = onnx.load(str(manifest.engine_path))
    assert engine.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert engine.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    halves = [i for i in engine.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert halves, "weights should be stored in fp16"
    assert "Pow" in manifest.options["fp16_op_block_list"]
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 5, 32)).astype(np.float32)}
    cos = cosine(run_engine(tmp_path / "fp16", feeds)[0], run_ort(mlp(), feeds)[0])
    print(f"MLP fp16 cosine: {cos:.7f}")
    assert cos > 0.9999


def test_transformer_fusions_on_a_real_bert_export(tiny_bert: Path, tmp_path: Path) -> None:
    feeds = bert_feeds()
    reference = run_ort(str(tiny_bert), feeds)[0]
    manifest = build_ort_engine(tiny_bert, tmp_path / "opt")
    assert manifest.model_type == "bert" and manifest.options["optimizer"] == "transformers"
    assert (manifest.options["num_heads"], manifest.options["hidden_size"]) == (4, 32)
    fused = manifest.fusions["engine"]
    assert fused["Attention"] == 2 and fused["SkipLayerNormalization"] == 4
    assert fused["EmbedLayerNormalization"] == 1 and fused["BiasGelu"] == 2
    assert manifest.fusions["source"]["Attention"] == 0
    assert sorted(manifest.files) == ["config.json", "vocab.txt"]
    assert (tmp_path / "opt" / "vocab.txt").read_text() == (
        tiny_bert.parent / "vocab.txt"
    ).read_text()
    np.testing.assert_allclose(run_engine(tmp_path / "opt", feeds)[0], reference, atol=FP32_ATOL)


@pytest.mark.parametrize(("precision", "bound"), [("fp16", 0.99999), ("int8", 0.9999)])
def test_lossy_bert_engines_report_their_cosine(
    tiny_bert: Path, tmp_path: Path, precision: str, bound: float
) -> None:
    feeds = bert_feeds(batch=4, seed=3)
    reference = run_ort(str(tiny_bert), feeds)[0]
    manifest = build_ort_engine(tiny_bert, tmp_path / precision, **{precision: True})
    out = run_engine(tmp_path / precision, feeds)[0]
    cos = cosine(out, reference)
    print(f"tiny BERT {precision} cosine {cos:.6f}, max |diff| {np.abs(out - reference).max():.3g}")
    assert cos > bound
    if precision == "int8":
        q = manifest.quantization
        assert q is not None and q["unquantized"] == [] and q["quantized"] == q["weights"] > 0
        assert manifest.fusions["engine"]["QAttention"] == 2


def test_bad_requests_fail_in_one_sentence_and_write_nothing(
    mlp_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "engine"
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"model": text}, ModelLoadError, "is not an ONNX model"),
        ({"format": "tflite"}, ConfigError, "'format' is 'tflite'; choose one of onnx, ort"),
        ({"fp16": True, "int8": True}, ConfigError, "cannot be combined"),
        ({"model_type": "t5"}, ConfigError, "Unknown model type 't5'"),
        ({"providers": "nonsense"}, BackendUnavailableError, "'nonsense' is not available"),
        ({"out_dir": mlp_path.parent}, ConfigError, "contains the input"),
        ({"out_dir": mlp_path}, ConfigError, "is the input"),
    ]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        cases.append(({"providers": "cuda"}, BackendUnavailableError, r"factorlm\[gpu\]"))
    for overrides, error, needle in cases:
        kwargs = {"model": mlp_path, "out_dir": out, **overrides}
        with pytest.raises(error, match=needle) as info:
            build_ort_engine(**kwargs)  # type: ignore[arg-type]
        assert "\n" not in str(info.value)
        assert not out.exists() and leftovers(tmp_path) == []
    assert sorted(os.listdir(mlp_path.parent)) == ["mlp.onnx"]


def test_existing_output_is_replaced_only_with_overwrite(mlp_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="--overwrite"):
        build_ort_engine(mlp_path, out)
    assert (out / "old.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="not created by factorlm"):  # not ours to delete
        build_ort_engine(mlp_path, out, overwrite=True)
    assert (out / "old.txt").read_text() == "keep me"
    ours = tmp_path / "ours"
    build_ort_engine(mlp_path, ours)
    (ours / "old.txt").write_text("stale")
    build_ort_engine(mlp_path, ours, overwrite=True)
    assert sorted(os.listdir(ours)) == [".factorlm-owned", "manifest.json", "model.onnx"]
    assert leftovers(tmp_path) == []


def test_a_failing_build_leaves_no_half_written_engine(tmp_path: Path) -> None:
    model = mlp()
    model.graph.node[2].op_type = "NoSuchOp"  # valid protobuf, but no runtime kernel
    src = tmp_path / "broken.onnx"
    onnx.save(model, src)
    out = tmp_path / "engine"
    with pytest.raises(FactorlmError, match="ONNX Runtime could not build an engine"):
        build_ort_engine(src, out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_sidecar_symlink_leaving_the_model_folder_is_refused_before_any_work(
    mlp_path: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not a vocabulary")
    (mlp_path.parent / "vocab.txt").symlink_to(outside)
    out = tmp_path / "engine"
    with pytest.raises(ModelLoadError, match="outside the model folder") as info:
        build_ort_engine(mlp_path, out)
    assert "\n" not in str(info.value)
    assert not out.exists() and leftovers(tmp_path) == []
