"""The real all-MiniLM-L6-v2 against two SVD compressions: one report with latency and accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_minilm_two_budgets_one_report(tmp_path: Path) -> None:
    from factorlm.assets import exported_minilm, reviews_path
    from factorlm.bench import run_benchmark
    from factorlm.compression import compress

    reference = exported_minilm()
    candidates = []
    for ratio in (0.75, 0.5):
        out = tmp_path / f"svd-{ratio}" / "model.onnx"
        compress(reference, out, method="svd", ratio=ratio, joint_qkv=False)
        candidates.append(f"svd-{ratio}={out.parent}")
    report = run_benchmark(
        f"minilm={reference.parent}",
        candidates,
        shapes=["1x64"],
        warmup=2,
        iterations=8,
        data=reviews_path(),
        task="classification",
        labels=["fresh", "rotten"],
        skip_rows=256,
        max_samples=300,
        max_length=64,
        max_accuracy_drop=100.0,
        min_speedup=0.01,
    )
    files = report.write(tmp_path / "report")
    data = json.loads(files["json"].read_text())
    assert report.passed
    task = data["task"]
    assert task["details"]["rows_scored"] == 300 and task["details"]["folds"] == 5
    assert task["reference"] > task["details"]["majority_percent"]
    for name in ("svd-0.75", "svd-0.5"):  # cross-fitted probe: interval around the drop
        low, high = task["drop_interval"][name]
        assert low <= task["drop"][name] <= high and 0.5 < task["agreement"][name] <= 1.0
    assert "95 % interval" in files["markdown"].read_text()
    speed = {n: s["estimate"] for n, s in data["latency"][0]["speedup"].items()}
    assert set(speed) == {"svd-0.75", "svd-0.5"}
    cos = {
        n: f["outputs"]["last_hidden_state"]["pooled_cosine_mean"]
        for n, f in data["fidelity"].items()
    }
    # fewer parameters kept, further from the original
    assert 0.0 < cos["svd-0.5"] < cos["svd-0.75"] < 1.0
    assert "data:image/png;base64," in files["html"].read_text()
