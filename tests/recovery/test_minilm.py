"""Real all-MiniLM-L6-v2 (slow): whitened plans applied in PyTorch export the compressed graph.

A joint-Q/K/V plan exports the joint graph too, and its ORT engine keeps every fusion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from factorlm.errors import DataError

pytestmark = pytest.mark.slow


def test_minilm_whiten_plan_matches_graph_passes(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from factorlm import assets
    from factorlm.calibration import collect_statistics
    from factorlm.compress import compress
    from factorlm.exporters.hf import _load_torch_model
    from factorlm.recovery import apply_plan
    from factorlm.recovery.export import export_student

    try:
        onnx_model, hf_dir, reviews = (
            assets.exported_minilm(),
            assets.minilm_dir(),
            assets.reviews_path(),
        )
    except DataError as exc:
        pytest.skip(str(exc))
    stats = collect_statistics(onnx_model, reviews, max_samples=256, progress=False)
    made = compress(
        onnx_model, tmp_path / "p" / "model.onnx", method="whiten", ratio=0.6, stats=stats
    )
    # The plan file path (``factorlm compress --plan``) factorizes with ``decompose``, as recovery does.
    result = compress(onnx_model, tmp_path / "c" / "model.onnx", plan=made.plan_path, stats=stats)
    model = _load_torch_model(hf_dir, "feature-extraction", False)
    applied = apply_plan(model, result.plan, onnx_model, stats=stats)
    assert len(applied.modules) == len(result.plan.weights) > 0
    factors = {
        n: [t.detach().numpy().copy() for t in model.get_submodule(p).factor_tensors()]
        for n, p in applied.modules.items()
    }
    info = export_student(model, hf_dir, tmp_path / "student", "feature-extraction", factors)
    assert info["tagged_factors"] == 2 * len(applied.modules)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    texts = ["A quiet triumph, funny and sad.", "Tedious, overlong and loud; the plot never lands."]
    enc = tok(texts, padding=True, return_tensors="np")
    feeds = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
    outs = []
    for path in (tmp_path / "c" / "model.onnx", tmp_path / "student" / "model.onnx"):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        outs.append(
            session.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in names})[0]
        )
    expected, got = outs
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_minilm_joint_whiten_plan_matches_and_keeps_every_fusion(tmp_path: Path) -> None:
    """A joint-Q/K/V plan applied in PyTorch exports the joint graph, and its engine fuses."""
    from transformers import AutoTokenizer

    from factorlm import assets
    from factorlm.calibration import collect_statistics
    from factorlm.compress import compress
    from factorlm.exporters.hf import _load_torch_model
    from factorlm.exporters.ort import build_ort_engine
    from factorlm.recovery import apply_plan
    from factorlm.recovery.export import export_student

    try:
        onnx_model, hf_dir, reviews = (
            assets.exported_minilm(),
            assets.minilm_dir(),
            assets.reviews_path(),
        )
    except DataError as exc:
        pytest.skip(str(exc))
    stats = collect_statistics(onnx_model, reviews, max_samples=256, progress=False)
    made = compress(
        onnx_model, tmp_path / "p" / "model.onnx", method="whiten", ratio=0.6, stats=stats,
        joint_qkv=True,
    )  # fmt: skip
    joint = [name for name in made.plan.weights if "+" in name]
    assert joint  # the planner decides how many layers get a joint Q/K/V
    result = compress(onnx_model, tmp_path / "c" / "model.onnx", plan=made.plan_path, stats=stats)
    model = _load_torch_model(hf_dir, "feature-extraction", False)
    applied = apply_plan(model, result.plan, onnx_model, stats=stats)
    assert set(applied.modules) == set(result.plan.weights)
    factors = {
        n: [t.detach().numpy().copy() for t in model.get_submodule(p).factor_tensors()]
        for n, p in applied.modules.items()
    }
    info = export_student(model, hf_dir, tmp_path / "student", "feature-extraction", factors)
    assert info["tagged_factors"] == 2 * len(applied.modules) + 2 * len(joint)  # L + 3 R
    tok = AutoTokenizer.from_pretrained(hf_dir)
    texts = ["A quiet triumph, funny and sad.", "Tedious, overlong and loud; the plot never lands."]
    enc = tok(texts, padding=True, return_tensors="np")
    feeds = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}

    def run(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        wanted = {k: v for k, v in feeds.items() if k in names}
        return np.asarray(session.run(["last_hidden_state"], wanted)[0])

    student = tmp_path / "student" / "model.onnx"
    expected, got = run(tmp_path / "c" / "model.onnx"), run(student)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    engine = build_ort_engine(
        student, tmp_path / "engine", optimize=True, model_type="bert", reference=onnx_model
    )
    fused = engine.fusions["engine"]
    assert fused["Attention"] == 6
    assert fused["SkipLayerNormalization"] == 12
    assert fused["BiasGelu"] == 6
    assert fused["EmbedLayerNormalization"] == 1
    assert engine.extra["lost_fusions"] == {}
    assert engine.extra["factor_fusion"]["attention"] == len(joint)
    assert engine.extra["factor_fusion"]["dense"] == []
    np.testing.assert_allclose(run(engine.engine_path), got, atol=1e-4, rtol=0)
