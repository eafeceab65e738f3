"""Real all-MiniLM-L6-v2 (slow): whitened plans applied in PyTorch export the compressed graph.

A joint-Q/K/V plan exports the joint graph too, and its ORT engine keeps every fusion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from factorlm.errors import DataError

pytestmark = pytest.mark.slow

TEXTS = ["A quiet triumph, funny and sad.", "Tedious, overlong and loud; the plot never lands."]


@pytest.fixture(scope="module")
def minilm() -> tuple[Path, Path, Any]:
    """The exported model, its Hugging Face folder and whitening statistics on 256 reviews."""
    from factorlm import assets
    from factorlm.calibration import collect_statistics

    try:
        onnx_model, hf_dir, reviews = (
            assets.exported_minilm(),
            assets.minilm_dir(),
            assets.reviews_path(),
        )
    except DataError as exc:
        pytest.skip(str(exc))
    return (
        onnx_model,
        hf_dir,
        collect_statistics(onnx_model, reviews, max_samples=256, progress=False),
    )


def compress_and_apply(
    minilm: tuple[Path, Path, Any], tmp_path: Path, *, joint_qkv: bool
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Compress with a plan (as ``factorlm compress --plan``), apply it in PyTorch, export it."""
    from factorlm.compression import compress
    from factorlm.exporters.hf import load_torch_model
    from factorlm.recovery import apply_plan
    from factorlm.recovery.export import export_student

    onnx_model, hf_dir, stats = minilm
    made = compress(
        onnx_model, tmp_path / "p" / "model.onnx", method="whiten", ratio=0.6, stats=stats,
        joint_qkv=joint_qkv,
    )  # fmt: skip
    result = compress(onnx_model, tmp_path / "c" / "model.onnx", plan=made.plan_path, stats=stats)
    model = load_torch_model(hf_dir, "feature-extraction", False)
    applied = apply_plan(model, result.plan, onnx_model, stats=stats)
    factors = {
        n: [t.detach().numpy().copy() for t in model.get_submodule(p).factor_tensors()]
        for n, p in applied.modules.items()
    }
    info = export_student(model, hf_dir, tmp_path / "student", "feature-extraction", factors)
    return made, result, applied, info


def last_hidden_state(path: Path, hf_dir: Path) -> np.ndarray:
    """``last_hidden_state`` of ``path`` on TEXTS under ONNX Runtime."""
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(hf_dir)(TEXTS, padding=True, return_tensors="np")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in names}
    return np.asarray(session.run(["last_hidden_state"], feeds)[0])


def test_minilm_whiten_plan_matches_graph_passes(
    minilm: tuple[Path, Path, Any], tmp_path: Path
) -> None:
    _, result, applied, info = compress_and_apply(minilm, tmp_path, joint_qkv=False)
    assert len(applied.modules) == len(result.plan.weights) > 0
    assert info["tagged_factors"] == 2 * len(applied.modules)
    expected = last_hidden_state(tmp_path / "c" / "model.onnx", minilm[1])
    got = last_hidden_state(tmp_path / "student" / "model.onnx", minilm[1])
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_minilm_joint_whiten_plan_matches_and_keeps_every_fusion(
    minilm: tuple[Path, Path, Any], tmp_path: Path
) -> None:
    """A joint-Q/K/V plan applied in PyTorch exports the joint graph, and its engine fuses."""
    from factorlm.exporters.ort import build_ort_engine

    onnx_model, hf_dir, _ = minilm
    made, result, applied, info = compress_and_apply(minilm, tmp_path, joint_qkv=True)
    joint = [name for name in made.plan.weights if "+" in name]
    assert joint  # the planner decides how many layers get a joint Q/K/V
    assert set(applied.modules) == set(result.plan.weights)
    assert info["tagged_factors"] == 2 * len(applied.modules) + 2 * len(joint)  # L + 3 R
    student = tmp_path / "student" / "model.onnx"
    expected = last_hidden_state(tmp_path / "c" / "model.onnx", hf_dir)
    got = last_hidden_state(student, hf_dir)
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
    np.testing.assert_allclose(
        last_hidden_state(engine.engine_path, hf_dir), got, atol=1e-4, rtol=0
    )
