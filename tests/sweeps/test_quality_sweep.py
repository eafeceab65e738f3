"""examples/minilm-quality-sweep.yaml: the MiniLM quality table's grid as a sweep file.

The file must hold exactly ``benchmarks/quality.py``'s MiniLM grid (its methods at its budgets,
in its order), every trial must validate as a run config and as compress options, and nothing
in it may name this machine, so the same file reruns on a cluster; the slow test reruns it on
Ray's two-node test cluster (axes narrowed by ``benchmarks/sweep_vs_quality.py``, the one change
that script makes to the file).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from factorlm.options import BuildOptions, CompressOptions
from factorlm.sweeps.config import load_sweep

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "minilm-quality-sweep.yaml"


def _benchmark(name: str) -> ModuleType:
    """A module of benchmarks/ (a folder of scripts, not a package), imported by path."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # sweep_vs_quality imports quality by name
    spec.loader.exec_module(module)
    return module


def test_sweep_file_is_the_quality_grid() -> None:
    quality = _benchmark("quality")
    config = load_sweep(EXAMPLE)
    trials = config.trials()
    grid = [(t.config.compress.method, t.config.compress.ratio) for t in trials]
    assert grid == quality.grid("minilm", False, quality.METHODS, None)  # same points, same order
    assert len(grid) == 18 and len({t.id for t in trials}) == 18
    for t in trials:
        cfg = t.config
        t.config.options(CompressOptions)  # each trial's options pass the compress checks
        t.config.options(BuildOptions)
        assert cfg.compress.joint_qkv is True  # quality.py --qkv auto: joint for MiniLM
        assert cfg.data.calibration_samples == quality.MINILM_CALIB_ROWS
        assert cfg.data.eval_samples == quality.MINILM_EVAL
        assert cfg.calibration.max_length == quality.MINILM_SEQ
        assert cfg.benchmark.shapes == [f"1x{quality.MINILM_SEQ}"]
        assert cfg.benchmark.task == "classification" and cfg.build.optimize
        assert cfg.output_dir.parent.parent == config.output_dir
    # Nothing machine-specific: default assets, no cluster address, no CPU count.
    spec = yaml.safe_load(EXAMPLE.read_text())
    assert spec["base"]["model"] is None and spec["base"]["data"]["path"] is None
    assert config.ray.address is None and config.ray.num_cpus is None
    assert config.select.pareto


def test_comparison_script_keeps_the_file_or_narrows_its_axes_only(tmp_path: Path) -> None:
    quality = _benchmark("quality")
    script = _benchmark("sweep_vs_quality")
    assert (script.METHODS, script.RATIOS) == (quality.METHODS, quality.RATIOS)
    assert script.sweep_file(list(quality.METHODS), list(quality.RATIOS), tmp_path) == EXAMPLE
    reduced = script.sweep_file(["svd", "whiten"], [0.5, 0.6], tmp_path)
    original, copy = yaml.safe_load(EXAMPLE.read_text()), yaml.safe_load(reduced.read_text())
    assert copy.pop("axes") == {"compress.ratio": [0.5, 0.6], "compress.method": ["svd", "whiten"]}
    original.pop("axes")
    assert copy == original
    trials = load_sweep(reduced).trials()
    assert [t.params for t in trials] == [
        {"compress.ratio": r, "compress.method": m} for r in (0.5, 0.6) for m in ("svd", "whiten")
    ]


def test_side_by_side_table_pairs_the_points() -> None:
    script = _benchmark("sweep_vs_quality")
    point = {"linear_kept": 0.6, "accuracy": 61.3, "drop": 12.6, "cosine": 0.4869, "speedup": 1.44}
    other = {**point, "accuracy": 63.1, "drop": 8.5, "speedup": 1.35}
    run = {"command": "x", "exit": 0, "load_before": "-", "load_after": "-"}
    result: dict[str, Any] = {
        "command": "python benchmarks/sweep_vs_quality.py --methods svd --ratios 0.6",
        "methods": ["svd"], "ratios": [0.6], "grid_points": 1, "order": ["quality", "sweep"],
        "cache": "cold", "sweep_file": "s.yaml", "machine": {"cpu": "cpu", "cpu_count": 2},
        "runs": {"quality": {**run, "wall_s": 100.0}, "sweep": {**run, "wall_s": 80.0}},
        "points": {
            "quality": {script.ORIGINAL: {"accuracy": 73.9}, ("svd", 0.6): point},
            "sweep": {script.ORIGINAL: {"accuracy": 71.6}, ("svd", 0.6): other},
        },
    }  # fmt: skip
    text = script.markdown(result)
    assert "| original | 1.0 | 1.000 | 73.90 / 71.60 |" in text
    assert "| svd | 0.6 | 0.600 / 0.600 | 61.30 / 63.10 | +12.60 / +8.50 |" in text
    assert "Sweep / quality.py wall time: 0.80 (no slower: target MET)" in text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quality_sweep_reruns_on_two_nodes(ray_cluster: Any, tmp_path: Path) -> None:
    """The file's base config, selection and Ray settings unchanged, one point of its grid,
    on the two-node test cluster (real MiniLM and reviews; about a minute on 2 busy cores)."""
    from factorlm import cli
    from factorlm.assets import minilm_dir, reviews_path
    from factorlm.errors import DataError

    try:
        minilm_dir(), reviews_path()
    except DataError as exc:
        pytest.skip(str(exc))
    reduced = _benchmark("sweep_vs_quality").sweep_file(["svd"], [0.6], tmp_path)
    out = tmp_path / "out"
    argv = ["sweep", str(reduced), "-o", str(out), "--address", ray_cluster.address, "-q"]
    assert cli.main(argv) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert data["nodes"] == 2
    [trial] = data["trials"]
    assert trial["status"] == "done", trial.get("error")
    assert trial["metric"] == "accuracy_percent" and 50 < trial["quality"] <= 100
    assert trial["speedup"] > 0 and trial["speedups"].keys() == {"1x128"}
    report = json.loads((Path(trial["output_dir"]) / "benchmark" / "report.json").read_text())
    assert report["settings"]["shapes"] == ["1x128"] and report["settings"]["iterations"] == 30
