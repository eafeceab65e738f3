"""Pipeline cache: keys follow library versions, ``force`` reruns all, one run per output folder."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

import factorlm
from factorlm.errors import ConfigError
from factorlm.pipeline import run as pipeline_run
from factorlm.pipeline.artifacts import LOCK_NAME, ArtifactStore, lock_output_dir
from factorlm.pipeline.config import RunConfig, parse_config

STAGES = [s for s in pipeline_run.STAGE_ORDER if s != "recover"]  # a run without recovery


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> RunConfig:
    folder = tmp_path_factory.mktemp("cache")
    rng = random.Random(1)
    words = ["good", "bad", "film", "plot", "great", "awful", "the", "a"]
    with (folder / "reviews.jsonl").open("w") as handle:
        for i in range(80):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
            handle.write(json.dumps({"text": f"{text} {i}", "label": ["neg", "pos"][i % 2]}) + "\n")
    return parse_config(
        {
            "model": str(tiny_bert_dir),
            "output_dir": str(folder / "out"),
            "data": {
                "path": str(folder / "reviews.jsonl"),
                "labels": ["neg", "pos"],
                "calibration_samples": 20,
                "eval_samples": 40,
            },
            "calibration": {"max_length": 16, "batch_size": 8},
            "compress": {"method": "whiten", "ratio": 0.7, "rank_multiple": 2, "min_size": 64},
            "benchmark": {"shapes": ["1x16"], "warmup": 0, "iterations": 3},
        }
    )


def _run(config: RunConfig, force: bool = False) -> dict[str, bool]:
    result = pipeline_run.run_pipeline(config, console=Console(quiet=True), force=force)
    return {stage.name: stage.skipped for stage in result.stages}


def _bump(monkeypatch: pytest.MonkeyPatch, dist: str) -> None:
    real = pipeline_run.installed_versions()

    def bumped() -> dict[str, str]:
        return {**real, dist: real.get(dist, "0") + ".post999"}

    monkeypatch.setattr(pipeline_run, "installed_versions", bumped)


def test_version_change_reruns_only_the_stages_that_use_the_library(
    config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _run(config)
    assert list(first) == STAGES
    assert _run(config) == dict.fromkeys(STAGES, True)  # nothing changed: all reused

    # scikit-learn (the benchmark's probe) only: the engines are reused, the report is redone
    _bump(monkeypatch, "scikit-learn")
    assert _run(config) == {**dict.fromkeys(STAGES, True), "benchmark": False}

    # onnxruntime: the export's check, the statistics (and so the plan), the engines and the
    # report depend on it; the data split does not
    _bump(monkeypatch, "onnxruntime")
    assert _run(config) == {**dict.fromkeys(STAGES, False), "data": True}

    # a new factorlm reruns every stage
    _bump(monkeypatch, "factorlm")
    assert _run(config) == dict.fromkeys(STAGES, False)


def test_stage_versions_name_factorlm_and_the_stage_libraries() -> None:
    installed = {"factorlm": "1.0", "onnxruntime": "1.20", "torch": "2.5", "scikit-learn": "1.6"}
    assert pipeline_run.stage_versions("data", installed) == {"factorlm": "1.0"}
    assert pipeline_run.stage_versions("build", installed) == {
        "factorlm": "1.0",
        "onnxruntime": "1.20",
    }
    assert "scikit-learn" in pipeline_run.stage_versions("benchmark", installed)
    assert set(pipeline_run.STAGE_LIBRARIES) == {*STAGES, "recover"}


def test_force_reruns_every_stage(config: RunConfig) -> None:
    _run(config)
    assert _run(config, force=True) == dict.fromkeys(STAGES, False)
    assert _run(config) == dict.fromkeys(STAGES, True)  # and the forced outputs are reusable


def test_force_through_the_api_signature() -> None:
    import inspect

    assert inspect.signature(factorlm.run).parameters["force"].default is False
    assert inspect.signature(pipeline_run.run_pipeline).parameters["force"].default is False


HOLDER = """
import fcntl, sys, time
with open(sys.argv[1], "a+") as handle:
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_run_on_a_locked_folder_refuses_and_deletes_nothing(
    config: RunConfig, tmp_path: Path
) -> None:
    pytest.importorskip("fcntl")
    out = tmp_path / "busy"
    out.mkdir()
    # what a first run in progress has there: a half-built stage in a temporary folder
    (out / ".tmp-build-abc").mkdir()
    (out / ".tmp-build-abc" / "model.onnx").write_bytes(b"in progress")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out / LOCK_NAME)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        busy = config.model_copy(update={"output_dir": out})
        started = time.perf_counter()
        with pytest.raises(ConfigError) as info:
            pipeline_run.run_pipeline(busy, console=Console(quiet=True))
        assert time.perf_counter() - started < 5  # refuses at once, does not wait
        message = str(info.value)
        assert str(out) in message and "in use by another factorlm run" in message
        assert "\n" not in message
        assert (out / ".tmp-build-abc" / "model.onnx").read_bytes() == b"in progress"
        assert sorted(p.name for p in out.iterdir()) == [".factorlm.lock", ".tmp-build-abc"]
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_released_after_the_block_and_nested_use_refuses(tmp_path: Path) -> None:
    pytest.importorskip("fcntl")
    with lock_output_dir(tmp_path), pytest.raises(ConfigError, match="in use"):  # noqa: SIM117
        with lock_output_dir(tmp_path):
            pass
    with lock_output_dir(tmp_path):  # free again
        ArtifactStore(tmp_path)
