"""Real all-MiniLM-L6-v2, whitened joint-Q/K/V plans: the optimizer keeps every fusion (issue 10).

At 60% and 50% of linear parameters (calibration: the first 256 reviews), the compressed model's
engine holds the original's 6 Attention, 12 SkipLayerNormalization, 6 BiasGelu and 1
EmbedLayerNormalization, and computes what the unfused compressed model computes within 1e-4
on real held-out reviews. Ranks come from the planner and are not assumed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from factorlm.exporters.ort import build_ort_engine
from models import run_ort

pytestmark = pytest.mark.slow

CALIBRATION_ROWS = 256


@pytest.fixture(scope="module")
def minilm() -> Path:
    from factorlm.assets import exported_minilm

    return exported_minilm()


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    from factorlm.assets import reviews_path

    text = Path(reviews_path()).read_text(encoding="utf-8")
    return [json.loads(line)["text"] for line in text.split("\n") if line.strip()]


@pytest.fixture(scope="module")
def stats(minilm: Path, reviews: list[str]) -> Any:
    from factorlm.calibration import collect_statistics

    return collect_statistics(
        minilm,
        reviews[:CALIBRATION_ROWS],
        tokenizer=minilm.parent,
        max_samples=CALIBRATION_ROWS,
        progress=False,
    )


@pytest.mark.parametrize("ratio", [0.6, 0.5])
def test_whitened_joint_plans_keep_every_fusion(
    minilm: Path, reviews: list[str], stats: Any, ratio: float, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from factorlm.compression import compress

    out = tmp_path / "model.onnx"
    result = compress(minilm, out, method="whiten", ratio=ratio, stats=stats, joint_qkv=True)
    joint = sum("+" in name for name in result.plan.weights)  # the planner decides which
    kept = result.params_after / result.params_before
    assert kept <= ratio + 1e-9
    engine = build_ort_engine(out, tmp_path / "engine", model_type="bert", reference=minilm)
    fused = engine.fusions["engine"]
    assert fused["Attention"] == 6
    assert fused["SkipLayerNormalization"] == 12
    assert fused["BiasGelu"] == 6
    assert fused["EmbedLayerNormalization"] == 1
    assert engine.extra["lost_fusions"] == {}
    assert engine.extra["factor_fusion"]["dense"] == []
    assert engine.extra["factor_fusion"]["attention"] == joint  # each one is inside Attention

    tokenizer = AutoTokenizer.from_pretrained(str(minilm.parent))
    texts = reviews[CALIBRATION_ROWS : CALIBRATION_ROWS + 16]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    feeds = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
    expected = run_ort(str(out), feeds)[0]
    got = run_ort(str(engine.engine_path), feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
