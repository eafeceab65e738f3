"""``factorlm run`` with ``compress.ray_address``: calibrate and compress share one Ray session.

The tiny BERT review job runs every stage against the two-node test cluster: the calibration
Grams and the factorizations are both Ray work, and Ray is connected to once; a rerun reuses
every stage and does not connect at all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from factorlm import cli, distributed
from tiny_vocab import review_job, write_reviews


@pytest.fixture
def mapped(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions ``distributed.ordered_map`` sent to Ray, in order."""
    names: list[str] = []
    real_map = distributed.ordered_map

    def recording_map(func: Any, jobs: Any, **kwargs: Any) -> Any:
        names.append(func.__name__)
        return real_map(func, jobs, **kwargs)

    monkeypatch.setattr(distributed, "ordered_map", recording_map)
    return names


def test_run_connects_to_ray_once_for_calibrate_and_compress(
    ray_cluster: Any,
    tiny_bert_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mapped: list[str],
) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("FACTORLM_CACHE", str(tmp_path / "cache"))  # no cached statistics
    write_reviews(tmp_path / "reviews.jsonl")
    config = {**review_job(tiny_bert_dir), "output_dir": "out"}
    config["compress"]["ray_address"] = ray_cluster.address
    config["benchmark"]["goals"] = {"min_speedup": 0.01}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    caplog.set_level(logging.INFO, logger="factorlm.distributed")

    def starts() -> int:
        return sum(r.getMessage().startswith("Ray started") for r in caplog.records)

    assert cli.main(["run", str(tmp_path / "job.yaml")]) == 0
    assert mapped == ["_shard_job", "factorize_source"]  # both stages' work went to Ray
    assert starts() == 1  # ... in one session, closed after the compress stage
    assert not ray.is_initialized()

    caplog.clear()
    mapped.clear()
    assert cli.main(["run", str(tmp_path / "job.yaml")]) == 0
    assert mapped == [] and starts() == 0  # every stage reused: Ray not even connected to


def test_fisher_calibration_runs_without_ray(
    ray_cluster: Any,
    tiny_bert_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mapped: list[str],
) -> None:
    """FWSVD's gradients are PyTorch work in this process: its calibrate stage opens no Ray
    session; the compress stage after it still factorizes on Ray."""
    ray = pytest.importorskip("ray")
    from factorlm.pipeline import stages

    monkeypatch.setenv("FACTORLM_CACHE", str(tmp_path / "cache"))
    write_reviews(tmp_path / "reviews.jsonl")
    config = {**review_job(tiny_bert_dir), "output_dir": "out"}
    config["compress"].update(method="fwsvd", ray_address=ray_cluster.address)
    config["benchmark"]["goals"] = {"min_speedup": 0.01}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    ray_during_calibrate: list[bool] = []
    real_calibrate = stages.calibrate

    def watched(*args: Any) -> Any:
        ray_during_calibrate.append(ray.is_initialized())
        return real_calibrate(*args)

    monkeypatch.setattr(stages, "calibrate", watched)
    assert cli.main(["run", str(tmp_path / "job.yaml")]) == 0
    assert ray_during_calibrate == [False]
    assert mapped == ["factorize_source"]
