"""Decoder engines: ORT's fusions on a Llama exported with past, kept through factorization, and
int4 / static int8 of the whole decoder including its tied LM head.

What ORT 1.32's transformer optimizer does on optimum's Llama export (measured here): with
``model_type="qwen3"`` (what factorlm uses for the llama family) it fuses the RMSNorms
(SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization) and the rotary embeddings of
Q and K (RotaryEmbedding, two per layer); no MultiHeadAttention/GroupQueryAttention fusion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from factorlm.exporters.ort import build_ort_engine
from factorlm.options import BuildOptions
from models import run_ort
from tiny_vocab import TEXTS

from ..engine_models import cosine, run_engine

#: Fused ops of the tiny 2-layer Llama: 2 RMSNorms per layer + the final one (the first is
#: plain, the others absorb the residual Add), rotary on Q and K per layer.
LLAMA_FUSIONS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4,
                 "RotaryEmbedding": 4, "MultiHeadAttention": 0, "GroupQueryAttention": 0}  # fmt: skip


def decode_feeds(past: int = 3, new: int = 2, batch: int = 2) -> dict[str, np.ndarray]:
    """A decode step with ``past`` cached positions: rotary at offset positions is exercised."""
    rng = np.random.default_rng(7)
    feeds: dict[str, np.ndarray] = {
        "input_ids": rng.integers(4, 26, (batch, new)).astype(np.int64),
        "attention_mask": np.ones((batch, past + new), dtype=np.int64),
        "position_ids": np.tile(np.arange(past, past + new, dtype=np.int64), (batch, 1)),
    }
    for layer in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal(
                (batch, 2, past, 16)
            ).astype(np.float32)
    return feeds


@pytest.fixture(scope="module")
def compressed_llama(tiny_llama_past: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from factorlm.compression import compress

    out = tmp_path_factory.mktemp("llama-compressed") / "model.onnx"
    result = compress(
        tiny_llama_past, out, method="svd", ratio=0.6, rank_multiple=8, min_size=0,
        joint_qkv=True,
    )  # fmt: skip
    assert result.factorized > 0
    return out


def _fused(manifest: object, key: str = "engine") -> dict[str, int]:
    counts = manifest.fusions[key]  # type: ignore[attr-defined]
    return {name: counts[name] for name in LLAMA_FUSIONS}


def test_llama_engine_fuses_rmsnorm_and_rotary_and_matches_its_source(
    tiny_llama_past: Path, tmp_path: Path
) -> None:
    manifest = build_ort_engine(tiny_llama_past, tmp_path / "e")
    assert manifest.model_type == "llama" and manifest.options["optimizer"] == "transformers"
    assert _fused(manifest) == LLAMA_FUSIONS
    feeds = decode_feeds()
    expected = run_ort(str(tiny_llama_past), feeds)
    got = run_engine(tmp_path / "e", feeds)
    for a, b in zip(got, expected, strict=True):  # logits and every present key/value
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_factorized_llama_keeps_every_fusion(
    tiny_llama_past: Path, compressed_llama: Path, tmp_path: Path
) -> None:
    manifest = build_ort_engine(compressed_llama, tmp_path / "e", reference=tiny_llama_past)
    assert _fused(manifest, "reference") == LLAMA_FUSIONS
    assert _fused(manifest) == LLAMA_FUSIONS
    assert manifest.extra["lost_fusions"] == {}
    restored = manifest.extra["factor_fusion"]
    assert restored["dense"] == [] and restored["matmul"] > 0  # every factor pair put back
    feeds = decode_feeds()
    np.testing.assert_allclose(
        run_engine(tmp_path / "e", feeds)[0], run_ort(str(compressed_llama), feeds)[0], atol=1e-4
    )


def test_int4_quantizes_every_linear_weight_and_the_tied_head(
    compressed_llama: Path, tmp_path: Path
) -> None:
    fp32 = build_ort_engine(compressed_llama, tmp_path / "fp32")
    manifest = build_ort_engine(compressed_llama, tmp_path / "int4", int4=True)
    q = manifest.quantization
    assert q is not None
    model = onnx.load(str(compressed_llama), load_external_data=False)
    matmul_weights = {i.name for i in model.graph.initializer} & {
        n.input[1] for n in model.graph.node if n.op_type == "MatMul"
    }
    # every constant MatMul weight + the LM head (read through a Transpose, folded first)
    assert q["weights"] == q["quantized"] == len(matmul_weights) + 1
    assert q["factor_quantized"] == q["factor_weights"] > 0 and q["unquantized"] == []
    assert len(q["folded"]) == 1 and q["folded"][0].endswith("_transposed")
    assert (q["graph_weights"], q["graph_quantized"]) == (q["weights"] + 1, q["weights"])
    assert q["skipped"] == {
        "model.embed_tokens.weight": "embedding Gather: int4 quantizes MatMul weights only"
    }
    assert manifest.fusions["engine"]["MatMulNBits"] == q["weights"]
    assert _fused(manifest) == LLAMA_FUSIONS
    feeds = decode_feeds()
    cos = cosine(run_engine(tmp_path / "int4", feeds)[0], run_engine(fp32.directory, feeds)[0])
    print(f"factorized tiny Llama int4 logits cosine vs fp32 engine: {cos:.5f}")
    assert cos > 0.99


@pytest.mark.parametrize("optimize", [True, False])
def test_static_int8_of_a_decoder(tiny_llama_past: Path, tmp_path: Path, optimize: bool) -> None:
    opts = BuildOptions(optimize=optimize, int8=True, int8_mode="static")
    fp32 = build_ort_engine(tiny_llama_past, tmp_path / "fp32", optimize=optimize)
    manifest = build_ort_engine(tiny_llama_past, tmp_path / "q", opts, data=TEXTS)
    q = manifest.quantization
    assert q is not None and q["quantized"] == q["weights"] and q["unquantized"] == []
    assert q["settings"]["calibration_batches"] == 1  # 8 texts in one batch
    assert manifest.fusions["engine"]["DequantizeLinear"] >= q["weights"]
    # A prefill, what the calibration saw (activation ranges of random N(0, 1) past values in
    # ``decode_feeds`` lie far outside them: 0.81 there, 0.9999 with past values of scale 0.1).
    feeds = decode_feeds(past=0, new=12)
    cos = cosine(run_engine(tmp_path / "q", feeds)[0], run_engine(fp32.directory, feeds)[0])
    print(f"tiny Llama static int8 (optimize={optimize}) logits cosine: {cos:.5f}")
    assert cos > 0.99
