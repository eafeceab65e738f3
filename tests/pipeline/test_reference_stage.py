"""The original's engine and task outputs are stages of their own: a new budget reuses them."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from factorlm.bench.run import run_benchmark
from factorlm.pipeline import run as pipeline_run
from factorlm.pipeline import stages
from factorlm.pipeline.artifacts import hash_json
from factorlm.pipeline.config import RunConfig, parse_config


def _config(folder: Path, model: Path, **sections: Any) -> RunConfig:
    rng = random.Random(2)
    words = ["good", "bad", "film", "plot", "great", "awful", "the", "a"]
    data = folder / "reviews.jsonl"
    with data.open("w") as handle:
        for i in range(80):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
            handle.write(json.dumps({"text": f"{text} {i}", "label": ["neg", "pos"][i % 2]}) + "\n")
    return parse_config(
        {
            "model": str(model),
            "output_dir": str(folder / "out"),
            "data": {
                "path": str(data),
                "labels": ["neg", "pos"],
                "calibration_samples": 20,
                "eval_samples": 40,
            },
            "calibration": {"max_length": 16, "batch_size": 8},
            "compress": {"method": "svd", "ratio": 0.7, "rank_multiple": 2, "min_size": 64},
            "benchmark": {"shapes": ["1x16"], "warmup": 0, "iterations": 3},
            **sections,
        }
    )


def _with(config: RunConfig, section: str, **values: Any) -> RunConfig:
    part = getattr(config, section).model_copy(update=values)
    return config.model_copy(update={section: part})


def _run(config: RunConfig) -> pipeline_run.RunResult:
    return pipeline_run.run_pipeline(config, console=Console(quiet=True))


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> pipeline_run.RunResult:
    return _run(_config(tmp_path_factory.mktemp("reference"), tiny_bert_dir))


def _stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_ino, info.st_mtime_ns


def test_new_ratio_reuses_the_reference_engine_and_its_scores(
    first: pipeline_run.RunResult,
) -> None:
    config = parse_config(json.loads((first.output_dir / "manifest.json").read_text())["config"])
    engine = first.stage("reference").path / "model.onnx"
    index = first.stage("reference-scores").path / "index.json"
    before = (_stamp(engine), _stamp(index))
    assert first.report is not None
    assert first.report["task"]["reference_replay"]["ran"] == 0

    second = _run(_with(config, "compress", ratio=0.5))
    skipped = {s.name: s.skipped for s in second.stages}
    assert skipped["reference"] and skipped["reference-scores"]  # not rebuilt, not re-scored
    assert not skipped["compress"] and not skipped["build"] and not skipped["benchmark"]
    assert (_stamp(engine), _stamp(index)) == before  # the very same files
    assert second.stage("reference").key == first.stage("reference").key
    assert second.report is not None
    task = second.report["task"]
    assert task["reference_replay"]["replayed"] > 0 and task["reference_replay"]["ran"] == 0
    assert task["reference"] == first.report["task"]["reference"]
    assert second.report["latency"][0]["results"]["reference"]["samples_ms"]  # still timed live

    # equal to scoring the reference engine live, without the record
    options, data = stages.eval_inputs(config, second.stage("data").path)
    live = run_benchmark(
        second.stage("reference").path,
        [("compressed", second.stage("build").path / "compressed")],
        options,
        data=data,
    ).data
    assert live["task"]["reference"] == task["reference"]
    assert live["task"]["candidates"] == task["candidates"]
    assert live["fidelity"] == second.report["fidelity"]


def test_build_option_change_rebuilds_the_reference(first: pipeline_run.RunResult) -> None:
    config = parse_config(json.loads((first.output_dir / "manifest.json").read_text())["config"])
    changed = _run(_with(config, "build", optimize=not config.build.optimize))
    skipped = {s.name: s.skipped for s in changed.stages}
    assert skipped["export"] and skipped["compress"]
    assert not skipped["reference"] and not skipped["reference-scores"]
    assert changed.stage("reference").key != first.stage("reference").key
    source = json.loads((changed.stage("reference").path / "manifest.json").read_text())
    assert source["options"]["optimize"] is (not config.build.optimize)


def test_latency_settings_do_not_touch_the_reference_scores(
    first: pipeline_run.RunResult,
) -> None:
    config = parse_config(json.loads((first.output_dir / "manifest.json").read_text())["config"])
    keys = {
        hash_json(stages.reference_task_settings(c, first.stage("data").path))
        for c in (config, _with(config, "benchmark", iterations=7, warmup=2, shapes=["2x8"]))
    }
    assert len(keys) == 1
    longer = stages.reference_task_settings(
        _with(config, "benchmark", task="similarity"), first.stage("data").path
    )
    assert hash_json(longer) not in keys


def test_until_runs_only_the_shared_stages_which_a_full_run_then_reuses(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    """``until="reference-scores"`` (a sweep's shared job) stops before anything that depends on
    the compression; the whole run in the same folder then reuses those four stages."""
    config = _config(tmp_path, tiny_bert_dir)
    shared = pipeline_run.run_pipeline(
        config, console=Console(quiet=True), until="reference-scores"
    )
    assert [s.name for s in shared.stages] == ["export", "data", "reference", "reference-scores"]
    assert shared.report is None
    out = Path(config.output_dir)
    assert not (out / "compress").exists() and not (out / "benchmark").exists()
    whole = _run(config)
    skipped = {s.name: s.skipped for s in whole.stages}
    assert all(skipped[n] for n in ("export", "data", "reference", "reference-scores"))
    assert not skipped["compress"] and not skipped["benchmark"]
    assert whole.report is not None
    with pytest.raises(ValueError, match="until must name a stage"):
        pipeline_run.run_pipeline(config, console=Console(quiet=True), until="compile")


def test_until_stops_where_its_stage_is_skipped(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """With ``benchmark.task: none`` there are no reference scores: ``until`` that names them
    stops before calibrate/compress instead of running the whole pipeline."""
    config = _config(tmp_path, tiny_bert_dir, benchmark={"task": "none", "shapes": ["1x16"]})
    shared = pipeline_run.run_pipeline(
        config, console=Console(quiet=True), until="reference-scores"
    )
    assert [s.name for s in shared.stages] == ["export", "data", "reference"]
    assert not (Path(config.output_dir) / "compress").exists()


def test_stage_order_names_every_stage() -> None:
    assert sorted(pipeline_run.STAGE_ORDER) == sorted(pipeline_run.STAGE_LIBRARIES)
