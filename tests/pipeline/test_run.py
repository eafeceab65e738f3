"""``factorlm run`` end to end on a tiny real BERT: every stage, then a rerun that skips them all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from factorlm import cli
from factorlm.pipeline import run as pipeline_run
from factorlm.pipeline.artifacts import LOCK_NAME
from tiny_vocab import review_job, write_reviews


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("job")
    write_reviews(folder / "reviews.jsonl")
    config = {**review_job(tiny_bert_dir), "output_dir": "out"}
    config["benchmark"]["goals"] = {"min_speedup": 0.01}
    (folder / "job.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_run_executes_every_stage_then_reuses_them(job: Path) -> None:
    assert cli.main(["run", str(job / "job.yaml")]) == 0
    out = job / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["stages"]) == [
        "export",
        "data",
        "reference",
        "reference-scores",
        "calibrate",
        "compress",
        "build",
        "benchmark",
    ]
    assert (out / "build" / "compressed" / "manifest.json").is_file()
    report = json.loads((out / "benchmark" / "report.json").read_text())
    assert report["passed"] is True
    assert manifest["stages"]["compress"]["info"]["factorized"] > 0
    for name, entry in manifest["stages"].items():  # each stage's own peak RSS (issue 18)
        memory = entry["info"]["memory"]
        assert 0 < memory["start_rss_mib"] <= memory["peak_rss_mib"], name
        assert memory["peak_rss_mib"] <= memory["process_peak_rss_mib"] + 1, name

    calib = (out / "data" / "calibration.jsonl").read_text().splitlines()
    held_out = (out / "data" / "eval.jsonl").read_text().splitlines()
    assert len(calib) == 40 and len(held_out) == 60
    assert not {json.loads(r)["text"] for r in calib} & {json.loads(r)["text"] for r in held_out}

    before = {
        p: p.stat().st_mtime_ns
        for p in out.rglob("*")
        if p.is_file() and p.name not in ("manifest.json", LOCK_NAME)
    }
    assert cli.main(["run", str(job / "job.yaml")]) == 0
    after = {
        p: p.stat().st_mtime_ns
        for p in out.rglob("*")
        if p.is_file() and p.name not in ("manifest.json", LOCK_NAME)
    }
    assert before == after  # every stage reused, nothing rewritten


def test_changed_budget_reruns_from_compress_only(job: Path) -> None:
    config = yaml.safe_load((job / "job.yaml").read_text())
    config["compress"]["ratio"] = 0.5
    (job / "job2.yaml").write_text(yaml.safe_dump(config))
    export_model = job / "out" / "export" / "model.onnx"
    if not export_model.exists():
        assert cli.main(["run", str(job / "job.yaml")]) == 0
    stamp = export_model.stat().st_mtime_ns
    assert cli.main(["run", str(job / "job2.yaml")]) == 0
    assert export_model.stat().st_mtime_ns == stamp
    manifest = json.loads((job / "out" / "manifest.json").read_text())
    assert manifest["stages"]["compress"]["info"]["ratio"] == 0.5


def test_config_typo_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("compress:\n  methd: svd\n")
    assert cli.main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'compress.methd'; did you mean 'method'?" in err
    assert "Traceback" not in err
    assert not (tmp_path / "factorlm-run").exists()


def test_missing_model_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.yaml"
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n')
    job.write_text("model: nowhere\ndata:\n  path: d.jsonl\n")
    assert cli.main(["run", str(job)]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_recover_stage_sits_between_compress_and_build(job: Path) -> None:
    config = yaml.safe_load((job / "job.yaml").read_text())
    config["output_dir"] = "out-recover"
    config["recover"] = {
        "method": "distill", "steps": 4, "batch_size": 4, "clock": "cpu", "temperature": 1.5,
        "feature_fraction": 0.25, "lm_weight": 0.0,
    }  # fmt: skip
    (job / "job3.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(job / "job3.yaml")]) == 0
    manifest = json.loads((job / "out-recover" / "manifest.json").read_text())
    record = json.loads((job / "out-recover" / "recover" / "recovery.json").read_text())
    assert (record["train"]["clock"], record["train"]["temperature"]) == ("cpu", 1.5)
    assert record["train"]["feature_fraction"] == 0.25
    assert manifest["stages"]["recover"]["info"]["warning"] is None
    assert tuple(manifest["stages"]) == pipeline_run.STAGE_ORDER  # the order they ran in
    assert manifest["stages"]["recover"]["info"]["steps_done"] == 4
    engine = json.loads(
        (job / "out-recover" / "build" / "compressed" / "manifest.json").read_text()
    )
    assert "recover" in engine["source"]["path"]
    # Recovery keeps the default joint Q/K/V, so the recovered engine keeps its Attention node.
    compressed = next((job / "out-recover").rglob("model.plan.json"))
    assert any("+" in name for name in json.loads(compressed.read_text())["weights"])
    assert engine["extra"]["factor_fusion"]["attention"] >= 1
    assert engine["fusions"]["engine"]["Attention"] >= 1
    # A recover setting is part of the stage's key: changing it reruns recover, not compress.
    config["recover"]["temperature"] = 1.0
    (job / "job3b.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(job / "job3b.yaml")]) == 0
    again = json.loads((job / "out-recover" / "manifest.json").read_text())["stages"]
    assert again["compress"]["key"] == manifest["stages"]["compress"]["key"]
    assert again["recover"]["key"] != manifest["stages"]["recover"]["key"]
    record = json.loads((job / "out-recover" / "recover" / "recovery.json").read_text())
    assert record["train"]["temperature"] == 1.0


def test_interrupted_stage_leaves_nothing_and_the_next_run_resumes(
    job: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from factorlm.pipeline import load_config, stages
    from factorlm.pipeline import run as run_module

    config = yaml.safe_load((job / "job.yaml").read_text())
    config["output_dir"] = "out-interrupted"
    (job / "job4.yaml").write_text(yaml.safe_dump(config))
    real_build = stages.build_engines

    def interrupted(*args: object) -> None:
        out = args[-1]
        assert isinstance(out, Path)
        (out / "half-written.onnx").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "build_engines", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_module.run_pipeline(load_config(job / "job4.yaml"))
    out = job / "out-interrupted"
    assert not (out / "build").exists()
    assert not list(out.rglob("half-written.onnx"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert "build" not in manifest["stages"] and "compress" in manifest["stages"]

    monkeypatch.setattr(stages, "build_engines", real_build)
    assert cli.main(["run", str(job / "job4.yaml")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert "build" in manifest["stages"]
