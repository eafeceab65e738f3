"""Gating works both ways: a slower candidate fails, the reference against itself never does."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from factorlm.bench import goals_from_options, load_goals, run_benchmark
from factorlm.bench.latency import bootstrap_median, regression_interval, speedup_interval
from factorlm.errors import ConfigError

FAST = {"shapes": ["2x32"], "warmup": 3, "iterations": 25}


@pytest.fixture(scope="module")
def self_baseline(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stored report of the reference against itself: the latency a release is held to."""
    report = run_benchmark(models["ref"], [models["ref"]], **FAST)
    return report.write(tmp_path_factory.mktemp("baseline"), html_report=False)["json"]


def test_slower_candidate_fails_the_regression_gate(
    models: dict[str, Path], self_baseline: Path
) -> None:
    report = run_benchmark(
        models["ref"], [models["slow"]], baseline=self_baseline, max_regression="5%", **FAST
    )
    (goal,) = report.goals
    assert goal.goal.type == "max-regression" and not goal.passed
    assert goal.measured is not None and goal.measured > 100  # percent slower, far beyond 5 %
    assert "exceeds the allowed +5%" in goal.detail
    assert not report.passed
    # the slow copy is numerically identical: only latency distinguishes it
    out = report.data["fidelity"]["slow"]["outputs"]["last_hidden_state"]
    assert out["max_abs_error"] == 0.0 and out["cosine_min"] == pytest.approx(1.0, abs=1e-12)


def test_reference_against_itself_passes_five_times(
    models: dict[str, Path], self_baseline: Path
) -> None:
    for seed in range(5):
        report = run_benchmark(
            models["ref"],
            [models["ref"]],
            baseline=self_baseline,
            max_regression=5,
            seed=seed,
            **FAST,
        )
        (goal,) = report.goals
        assert goal.passed, goal.detail


def test_min_speedup_both_ways(models: dict[str, Path]) -> None:
    report = run_benchmark(models["slow"], [models["ref"]], min_speedup=1.5, **FAST)
    assert report.passed, report.goals[0].detail
    speed = report.data["latency"][0]["speedup"]["ref"]
    assert speed["ci_low"] > 1.5 and speed["ci_low"] <= speed["estimate"] <= speed["ci_high"]
    report = run_benchmark(models["ref"], [models["slow"]], min_speedup=1.0, **FAST)
    assert (
        not report.passed and report.goals[0].margin is not None and report.goals[0].margin < -0.5
    )


def test_reports_and_junit(models: dict[str, Path], tmp_path: Path) -> None:
    report = run_benchmark(
        models["ref"],
        ["light=" + str(models["ref"]), models["slow"]],
        min_speedup=0.75,
        max_fidelity_loss=0.001,
        **FAST,
    )
    files = report.write(tmp_path)
    data = json.loads(files["json"].read_text())
    assert data["schema"] == "factorlm.bench" and data["schema_version"] == 1
    assert [c["name"] for c in data["candidates"]] == ["light", "slow"]
    assert len(data["latency"][0]["results"]["ref"]["samples_ms"]) == 25
    assert data["environment"]["libraries"]["onnxruntime"]
    suite = ET.parse(files["junit"]).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "4" and suite.get("failures") == "1"
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["slow: min-speedup 0.75x"]
    page = files["html"].read_text()
    assert page.count("data:image/png;base64,") == 3  # distributions, speedup, accuracy vs speed
    assert "| 2x32 | slow |" in files["markdown"].read_text()


def test_bootstrap_intervals_are_deterministic_and_cover_the_estimate() -> None:
    rng = np.random.default_rng(1)
    ref = 1.0 + 0.05 * rng.standard_normal(200)
    cand = ref / 2.0
    a = speedup_interval(ref, cand, rng=np.random.default_rng(5))
    b = speedup_interval(ref, cand, rng=np.random.default_rng(5))
    assert a == b and a.estimate == pytest.approx(2.0) and a.low == pytest.approx(2.0)
    interval = bootstrap_median(ref, rng=np.random.default_rng(0))
    assert interval.low <= interval.estimate <= interval.high
    doubled = regression_interval((ref, 2 * ref), (ref, ref), rng=np.random.default_rng(0))
    assert doubled.estimate == pytest.approx(1.0) and doubled.low == pytest.approx(1.0)
    machine_slower = regression_interval(
        (2 * ref, 2 * ref), (ref, ref), rng=np.random.default_rng(0)
    )
    assert machine_slower.estimate == pytest.approx(0.0)  # relative basis cancels the machine
    absolute = regression_interval(
        (2 * ref, 2 * ref), (ref, ref), rng=np.random.default_rng(0), basis="absolute"
    )
    assert absolute.estimate == pytest.approx(1.0, rel=1e-6)


def test_goal_vocabulary(tmp_path: Path) -> None:
    path = tmp_path / "goals.yaml"
    path.write_text(
        "goals:\n  - type: max-accuracy-drop\n    value: 1\n  - {type: min_speedup, value: 1.5}\n"
    )
    assert [(g.type, g.value) for g in load_goals(path)] == [
        ("max-accuracy-drop", 1.0),
        ("min-speedup", 1.5),
    ]
    assert [g.type for g in load_goals({"max-regression": "5%"})] == ["max-regression"]
    assert goals_from_options(max_regression="7.5%")[0].value == 7.5
    for bad in ({"max-speed": 1}, {"min-speedup": "fast"}, {"min-speedup": -1}):
        with pytest.raises(ConfigError):
            load_goals(bad)
