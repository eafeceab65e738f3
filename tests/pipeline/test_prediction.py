"""The benchmark stage puts a latency-targeted plan's predicted speedup next to the measured one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factorlm.pipeline.stages import predicted_speedup
from factorlm.planning import Plan


def _engine(tmp_path: Path, latency: dict[str, object] | None) -> Path:
    source = tmp_path / "compressed" / "model.onnx"
    source.parent.mkdir()
    source.write_bytes(b"onnx")
    plan = Plan(method="svd", budget={"ratio": 0.6}, latency=latency)
    (tmp_path / "compressed" / "model.plan.json").write_text(plan.to_json())
    engine = tmp_path / "build" / "compressed"
    engine.mkdir(parents=True)
    manifest = {"source": {"path": str(source)}}
    (engine / "manifest.json").write_text(json.dumps(manifest))
    return engine


_REPORT = {
    "latency": [
        {
            "shape": "1x128",
            "speedup": {"compressed": {"estimate": 1.38, "ci_low": 1.3, "ci_high": 1.45}},
        },
        {
            "shape": "8x128",
            "speedup": {"compressed": {"estimate": 1.6, "ci_low": 1.5, "ci_high": 1.7}},
        },
    ]
}


def test_prediction_is_compared_at_the_planned_shape(tmp_path: Path) -> None:
    latency = {
        "predicted_speedup": 1.5,
        "predicted_ms": 4.0,
        "model_ms": 6.0,
        "config": {"batch": 8, "seq": 128},
    }
    found = predicted_speedup(_REPORT, "compressed", _engine(tmp_path, latency))
    assert found is not None
    assert found["shape"] == "8x128" and found["measured_speedup"] == 1.6
    assert found["error_pct"] == pytest.approx(100 * (1.6 / 1.5 - 1))
    assert (found["ci_low"], found["ci_high"]) == (1.5, 1.7)


def test_no_prediction_without_a_latency_plan(tmp_path: Path) -> None:
    assert predicted_speedup(_REPORT, "compressed", _engine(tmp_path, None)) is None
    assert predicted_speedup(_REPORT, "compressed", tmp_path / "missing") is None


def test_report_renders_the_prediction_table(tmp_path: Path) -> None:
    import onnx

    from factorlm.bench.report import render_html, render_markdown
    from factorlm.bench.run import run_benchmark
    from factorlm.options import BenchOptions
    from models import mlp

    model = tmp_path / "mlp.onnx"
    onnx.save_model(mlp(), str(model))
    options = BenchOptions(shapes=("1x8",), warmup=0, iterations=3, task="none")
    report = run_benchmark(model, [("compressed", model)], options)
    latency = {"predicted_speedup": 1.25, "predicted_ms": 1.0, "model_ms": 1.25}
    found = predicted_speedup(
        report.data, "compressed", _engine(tmp_path, {**latency, "config": {"batch": 1, "seq": 8}})
    )
    assert found is not None and found["measured_speedup"] is not None
    report.data["prediction"] = {"compressed": found}
    markdown = render_markdown(report)
    assert "## Predicted vs measured speedup" in markdown and "1.250x" in markdown
    assert "Predicted vs measured speedup" in render_html(report)
    assert json.loads(report.to_json())["prediction"]["compressed"]["shape"] == "1x8"
