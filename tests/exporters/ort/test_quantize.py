"""Quantized engines (dynamic/static int8, int4) quantize every constant MatMul weight, factor
matrices included, say which weights stayed float and why, and refuse bad combinations in one
sentence."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from factorlm.errors import ConfigError
from factorlm.exporters.ort import build_ort_engine, constant_matmul_weights
from factorlm.exporters.ort.quantize import fold_constant_transposes, weight_inventory
from factorlm.options import BuildOptions
from models import run_ort
from tiny_vocab import WORDS

from ..engine_models import bert_feeds, cosine, factorized_mlp, leftovers, run_engine


def test_factor_matrices_are_int8_quantized_and_counted(tmp_path: Path) -> None:
    model = factorized_mlp()
    src = tmp_path / "factorized.onnx"
    onnx.save(model, src)
    assert constant_matmul_weights(model) == {
        "fc1.weight.factorlm_left": True,
        "fc1.weight.factorlm_right": True,
        "fc2.weight.factorlm_left": True,
        "fc2.weight.factorlm_right": True,
    }
    manifest = build_ort_engine(src, tmp_path / "int8", int8=True)
    q = manifest.quantization
    assert q is not None
    assert (q["weights"], q["quantized"], q["factor_weights"], q["factor_quantized"]) == (
        4,
        4,
        4,
        4,
    )
    assert q["unquantized"] == []
    engine = onnx.load(str(manifest.engine_path))
    assert constant_matmul_weights(engine) == {}  # no float MatMul weight left anywhere
    assert (
        manifest.fusions["engine"]["MatMulInteger"]
        + manifest.fusions["engine"]["DynamicQuantizeMatMul"]
        == 4
    )
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 8, 32)).astype(np.float32)}
    cos = cosine(run_engine(tmp_path / "int8", feeds)[0], run_ort(model, feeds)[0])
    print(f"factorized MLP int8 cosine: {cos:.6f}")
    assert cos > 0.9999


# --- int4 weight-only, static QDQ int8, coverage and refusals -----------------------------------

#: Calibration texts in the tiny tokenizer's words (ids < 26, inside tiny BERT's 96-token vocab).
TEXTS = [" ".join(WORDS[(5 * i + 3 * j) % len(WORDS)] for j in range(4 + i % 9)) for i in range(24)]


def _float_engine(src: Path, tmp_path: Path) -> Path:
    return build_ort_engine(src, tmp_path / "fp32").engine_path


def test_int4_quantizes_every_factor_and_reports_ragged_blocks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = factorized_mlp()  # rank 8: R's K (the rank) is a quarter of a block of 32
    src = tmp_path / "factorized.onnx"
    onnx.save(model, src)
    with caplog.at_level(logging.WARNING, logger="factorlm.exporters.ort.quantize"):
        manifest = build_ort_engine(src, tmp_path / "int4", int4=True)
    q = manifest.quantization
    assert q is not None and q["method"] == "int4"
    assert (q["weights"], q["quantized"], q["factor_weights"], q["factor_quantized"]) == (
        4,
        4,
        4,
        4,
    )
    assert (q["graph_weights"], q["graph_quantized"], q["skipped"]) == (4, 4, {})
    assert q["settings"] == {"block_size": 32, "accuracy_level": 4, "symmetric": True}
    assert manifest.fusions["engine"]["MatMulNBits"] == 4
    assert "rank_multiple=32" in caplog.text and "factorlm_right" in caplog.text
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 8, 32)).astype(np.float32)}
    cos = cosine(run_engine(tmp_path / "int4", feeds)[0], run_ort(model, feeds)[0])
    print(f"factorized MLP int4 cosine: {cos:.6f}")
    assert cos > 0.999


@pytest.mark.parametrize(("block", "level"), [(16, 0), (32, 4), (64, 1)])
def test_int4_block_size_and_accuracy_level_reach_the_kernel(
    mlp_path: Path, tmp_path: Path, block: int, level: int
) -> None:
    opts = BuildOptions(int4=True, int4_block_size=block, int4_accuracy_level=level)
    manifest = build_ort_engine(mlp_path, tmp_path / "e", opts)
    engine = onnx.load(str(manifest.engine_path))
    nodes = [n for n in engine.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2
    for node in nodes:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["block_size"] == block and attrs["bits"] == 4
        assert attrs.get("accuracy_level", 0) == level  # 0 = unset, not written
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 5, 32)).astype(np.float32)}
    fp32 = run_ort(str(mlp_path), feeds)[0]
    cos = cosine(run_engine(tmp_path / "e", feeds)[0], fp32)
    print(f"MLP int4 block {block} level {level}: cosine {cos:.6f}")
    assert cos > 0.99  # 4-bit symmetric blocks of Gaussian weights: ~0.994-0.998


def test_int4_with_fp16_runs_and_stays_close(mlp_path: Path, tmp_path: Path) -> None:
    manifest = build_ort_engine(mlp_path, tmp_path / "e", fp16=True, int4=True)
    assert manifest.fusions["engine"]["MatMulNBits"] == 2
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 5, 32)).astype(np.float32)}
    cos = cosine(run_engine(tmp_path / "e", feeds)[0], run_ort(str(mlp_path), feeds)[0])
    assert cos > 0.99  # 4-bit symmetric blocks of Gaussian weights: ~0.994-0.998


def test_static_int8_of_a_bert_export_is_qdq_and_calibrated(
    tiny_bert: Path, tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    """Unfused (--no-optimize, the graph TensorRT and NPUs take): every linear weight is int8
    behind a DequantizeLinear; the three embedding tables stay float, each with its reason."""
    feeds = bert_feeds(batch=4, seed=5)
    reference = run_ort(str(tiny_bert), feeds)[0]
    opts = BuildOptions(optimize=False, int8=True, int8_mode="static", calibration_samples=16)
    manifest = build_ort_engine(
        tiny_bert, tmp_path / "static", opts, data=TEXTS, tokenizer=tiny_tokenizer_dir
    )
    q = manifest.quantization
    assert q is not None and q["method"] == "int8-static"
    # 2 layers x (Q, K, V, attention output, intermediate, output) MatMuls (+ the pooler Gemm
    # when the export has one): all quantized; word/position/token-type embeddings skipped.
    assert q["quantized"] == q["weights"] >= 12 and q["unquantized"] == []
    assert q["graph_weights"] == q["weights"] + 3 and q["graph_quantized"] == q["weights"]
    assert set(q["skipped"].values()) == {
        "embedding Gather: int8-static quantizes MatMul/Gemm weights only"
    }
    assert q["settings"]["calibration_batches"] == 2  # 16 texts in batches of 8
    ops = manifest.fusions["engine"]
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] >= q["weights"]
    assert ops["MatMulInteger"] == 0 and ops["DynamicQuantizeLinear"] == 0  # static, not dynamic
    engine = onnx.load(str(manifest.engine_path))
    int8_weights = [i for i in engine.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= q["weights"]
    cos = cosine(run_engine(tmp_path / "static", feeds)[0], reference)
    print(f"tiny BERT static int8 cosine {cos:.6f}")
    assert cos > 0.99


def test_static_int8_after_fusions_keeps_them_and_says_what_stayed_float(
    tiny_bert: Path, tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    feeds = bert_feeds(batch=4, seed=6)
    reference = run_ort(str(tiny_bert), feeds)[0]
    manifest = build_ort_engine(
        tiny_bert,
        tmp_path / "e",
        int8=True,
        int8_mode="static",
        data=TEXTS,
        tokenizer=tiny_tokenizer_dir,
    )
    q = manifest.quantization
    assert q is not None
    assert manifest.fusions["engine"]["Attention"] == 2  # fused Q/K/V stays fused (and float)
    assert q["unquantized"] and all(
        "Attention weight" in q["skipped"][name] for name in q["unquantized"]
    )
    assert q["quantized"] == q["weights"] - 2
    assert cosine(run_engine(tmp_path / "e", feeds)[0], reference) > 0.99


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"int4": True, "int8": True}, "--int4 and --int8 cannot be combined"),
        ({"fp16": True, "int8": True}, "--fp16 and --int8 cannot be combined"),
        ({"int8_mode": "static"}, "'int8_mode' is 'static' but int8 is off; add --int8"),
        ({"int4": True, "int4_block_size": 48}, "MatMulNBits needs a power of 2 from 16 to 256"),
        ({"int4": True, "int4_block_size": 8}, "'int4_block_size' is 8; it must be >= 16"),
        ({"int4": True, "int4_accuracy_level": 5}, "'int4_accuracy_level' is 5; it must be"),
        ({"int8": True, "int8_mode": "static"}, "--int8-mode static needs calibration texts"),
        ({"int8": True, "int8_mode": "fast"}, "'int8_mode' is 'fast'; choose one of dynamic"),
    ],
)
def test_refused_quantization_is_one_sentence_before_any_work(
    mlp_path: Path, tmp_path: Path, overrides: dict[str, object], needle: str
) -> None:
    out = tmp_path / "engine"
    with pytest.raises(ConfigError, match=re.escape(needle)) as info:
        build_ort_engine(mlp_path, out, **overrides)
    assert "\n" not in str(info.value) and str(info.value).endswith(".")
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_transposed_constant_is_folded_so_the_head_gets_quantized() -> None:
    """The tied-LM-head pattern: Gather(E) for the input, MatMul(h, Transpose(E)) for logits."""
    emb = np.random.default_rng(0).standard_normal((40, 32)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
            helper.make_node("Transpose", ["E"], ["E_t"], name="tie", perm=[1, 0]),
            helper.make_node("MatMul", ["h", "E_t"], ["logits"], name="head"),
        ],
        "tied",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", "s", 40])],
        [numpy_helper.from_array(emb, "E")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = weight_inventory(model)
    assert before["E"].op_type == "Gather"  # first consumer wins; the head reads it via Transpose
    assert fold_constant_transposes(model) == ("E_t",)
    after = weight_inventory(model)
    assert (after["E_t"].op_type, after["E_t"].via, after["E_t"].dims) == ("MatMul", None, (32, 40))
    ids = {"ids": np.array([[1, 5, 39]], dtype=np.int64)}
    np.testing.assert_allclose(run_ort(model, ids)[0], (emb[[1, 5, 39]] @ emb.T)[None], rtol=1e-5)


def test_factors_named_by_the_torch_exporter_are_found_through_the_metadata() -> None:
    """A recovered model's factors keep PyTorch's names; ``factorlm.factors`` still marks them."""
    rng = np.random.default_rng(1)
    left, right, dense = (
        rng.standard_normal(s).astype(np.float32) for s in ((8, 3), (3, 8), (8, 8))
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["t"], name="/fc/a/MatMul"),
            helper.make_node("MatMul", ["t", "onnx::MatMul_8"], ["y"], name="/fc/b/MatMul"),
            helper.make_node("MatMul", ["y", "dense_w"], ["z"], name="/out/MatMul"),
        ],
        "recovered",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["b", 8])],
        [
            numpy_helper.from_array(left, "onnx::MatMul_7"),
            numpy_helper.from_array(right, "onnx::MatMul_8"),
            numpy_helper.from_array(dense, "dense_w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert not any(constant_matmul_weights(model).values())  # untagged: nothing is a factor
    helper.set_model_props(
        model,
        {"factorlm.factors": '{"onnx::MatMul_7": "fc.weight", "onnx::MatMul_8": "fc.weight"}'},
    )
    assert constant_matmul_weights(model) == {
        "onnx::MatMul_7": True, "onnx::MatMul_8": True, "dense_w": False
    }  # fmt: skip
    assert {n for n, use in weight_inventory(model).items() if use.factor} == {
        "onnx::MatMul_7", "onnx::MatMul_8"
    }  # fmt: skip
