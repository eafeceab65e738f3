"""Factorized BERTs keep ONNX Runtime's Attention / EmbedLayerNorm fusions (tiny random BERT).

The compressed model factorizes Q/K/V jointly and every other linear weight; the engine must
hold as many fused ops as the original's engine, compute what the unfused compressed model
computes (float32, 1e-4), and int8 must quantize the fused Attention's factor weight too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from factorlm.compression import compress
from factorlm.exporters.fusions import collapse_factor_pairs, count_fusions
from factorlm.exporters.ort import build_ort_engine
from factorlm.io import load_model
from factorlm.passes import analyze
from factorlm.planning import Plan, WeightPlan
from models import run_ort

from .engine_models import bert_feeds

KEPT = ("Attention", "SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization")


@pytest.fixture(scope="module")
def joint_bert(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with Q/K/V jointly factorized and the other linear weights factorized."""
    out = tmp_path_factory.mktemp("joint") / "model.onnx"
    analysis = analyze(load_model(tiny_bert), joint=True)
    linear = [c for c in analysis.candidates if c.kind == "linear"]
    plan = Plan(method="svd", budget={})
    for cand in linear:  # every linear weight, at the smallest rank a backend likes
        plan.weights[cand.name] = WeightPlan(cand.node_names, "linear", [], [], "svd", rank=8)
    result = compress(tiny_bert, out, plan=plan, min_size=0, joint_qkv=True)
    joint = [name for name in result.plan.weights if "+" in name]
    assert len(joint) == 2 and len(result.plan.weights) == 2 + 2 * 3  # 2 layers: qkv, o, ffn x2
    for name in ("config.json", "vocab.txt"):
        shutil.copy(tiny_bert.parent / name, out.parent / name)
    return out


def _ops(path: Path) -> dict[str, int]:
    return {k: v for k, v in count_fusions(path).items() if v}


def test_joint_factorization_keeps_every_fusion_of_the_original(
    tiny_bert: Path, joint_bert: Path, tmp_path: Path
) -> None:
    original = build_ort_engine(tiny_bert, tmp_path / "original")
    engine = build_ort_engine(joint_bert, tmp_path / "compressed", reference=tiny_bert)
    for op in KEPT:
        assert engine.fusions["engine"][op] == original.fusions["engine"][op] > 0, op
    assert engine.fusions["reference"] == engine.fusions["optimized"] == original.fusions["engine"]
    assert engine.extra["lost_fusions"] == {}
    assert engine.extra["factor_fusion"]["attention"] == 2
    assert engine.extra["factor_fusion"]["dense"] == []
    # The factors are back: the Attention weight is [Rq Rk Rv] with r rows, fed by x @ L.
    model = onnx.load(str(engine.engine_path))
    inits = {i.name: i for i in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "Attention"):
        rank, width = inits[node.input[1]].dims
        assert width == 3 * 32 and rank < 32
    assert not any(name.endswith(".factorlm_dense") for name in inits)
    feeds = bert_feeds()
    expected = run_ort(str(joint_bert), feeds)[0]
    got = run_ort(str(engine.engine_path), feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_without_fuse_factors_the_loss_is_reported(
    tiny_bert: Path, joint_bert: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        engine = build_ort_engine(
            joint_bert, tmp_path / "plain", fuse_factors=False, reference=tiny_bert
        )
    assert engine.fusions["engine"]["Attention"] == 0
    assert engine.extra["lost_fusions"]["Attention"] == 2
    assert engine.extra["lost_fusions"]["EmbedLayerNormalization"] == 1
    assert "Attention (2 fewer)" in caplog.text


def test_reference_fusion_counts_from_its_own_build_give_the_same_check(
    tiny_bert: Path, joint_bert: Path, tmp_path: Path
) -> None:
    """``factorlm run`` passes the reference engine's counts instead of optimizing it again."""
    ref_engine = build_ort_engine(tiny_bert, tmp_path / "reference")
    counts = ref_engine.fusions["optimized"]
    by_path = build_ort_engine(joint_bert, tmp_path / "a", fuse_factors=False, reference=tiny_bert)
    by_counts = build_ort_engine(joint_bert, tmp_path / "b", fuse_factors=False, reference=counts)
    assert by_counts.fusions["reference"] == by_path.fusions["reference"] == counts
    assert by_counts.extra["lost_fusions"] == by_path.extra["lost_fusions"]
    assert by_counts.extra["lost_fusions"]["Attention"] == 2


def test_int8_quantizes_the_fused_attention_factors(joint_bert: Path, tmp_path: Path) -> None:
    engine = build_ort_engine(joint_bert, tmp_path / "int8", int8=True)
    ops = _ops(engine.engine_path)
    assert ops["QAttention"] == 2 and "Attention" not in ops
    quant = engine.quantization
    assert quant is not None and quant["unquantized"] == []
    assert quant["factor_quantized"] == quant["factor_weights"] > 0
    feeds = bert_feeds()
    expected = run_ort(str(joint_bert), feeds)[0].ravel()
    got = run_ort(str(engine.engine_path), feeds)[0].ravel()
    cosine = float(expected @ got / np.linalg.norm(expected) / np.linalg.norm(got))
    assert cosine > 0.99


def test_collapse_is_exact_and_leaves_feed_forward_pairs_alone(joint_bert: Path) -> None:
    model = onnx.load(str(joint_bert))
    before = run_ort(str(joint_bert), bert_feeds())[0]
    collapsed = collapse_factor_pairs(model)
    # Per layer: one joint Q/K/V group (3 members) and the attention output pair (fed by Reshape).
    assert len(collapsed) == 4
    assert sorted(len(g.members) for g in collapsed.groups) == [1, 1, 3, 3]
    after = run_ort(model, bert_feeds())[0]
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)
    assert collapse_factor_pairs(onnx.load(str(joint_bert)).__class__()).groups == []


def test_a_factorized_token_embedding_keeps_attention_and_a_fused_embedding_norm(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """EmbedLayerNormalization needs the dense table: it is lost, reported, and the rest holds.

    (The embedding LayerNorm then stays a plain LayerNormalization: its Add sums a (batch, seq)
    and a (1, seq) operand, which ORT's SkipLayerNormalization fusion does not broadcast.)
    """
    out = tmp_path / "emb" / "model.onnx"
    analysis = analyze(load_model(tiny_bert), joint=True)
    plan = Plan(method="svd", budget={})
    for cand in analysis.candidates:
        if cand.members or cand.name == "embeddings.word_embeddings.weight":
            plan.weights[cand.name] = WeightPlan(cand.node_names, cand.kind, [], [], "svd", rank=8)
    compress(tiny_bert, out, plan=plan, min_size=0)
    engine = build_ort_engine(out, tmp_path / "engine", model_type="bert", reference=tiny_bert)
    original = engine.fusions["reference"]
    fused = engine.fusions["engine"]
    assert fused["Attention"] == original["Attention"] == 2
    assert fused["EmbedLayerNormalization"] == 0
    assert fused["SkipLayerNormalization"] == original["SkipLayerNormalization"]
    assert fused["BiasGelu"] == original["BiasGelu"]
    assert engine.extra["lost_fusions"] == {"EmbedLayerNormalization": 1}
    feeds = bert_feeds()
    np.testing.assert_allclose(
        run_ort(str(engine.engine_path), feeds)[0], run_ort(str(out), feeds)[0], atol=1e-4, rtol=0
    )
