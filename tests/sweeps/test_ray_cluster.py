"""A real sweep on Ray's multi-node test cluster (two nodes, one CPU each) over a tiny BERT.

Four trials (ratio x include), two of which fail on purpose at run time (an include pattern
that is valid in the schema but matches no weight): the sweep records them and goes on, the
shared stages run once (a job of their own), the result files and best.yaml appear, and after a trial's result is
deleted a rerun runs only that trial.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

import factorlm  # noqa: E402
from factorlm import cli  # noqa: E402
from factorlm.pipeline.config import load_config  # noqa: E402
from tiny_vocab import review_job, write_reviews  # noqa: E402


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    write_reviews(folder / "reviews.jsonl")
    base = review_job(tiny_bert_dir)  # the run config of tests/pipeline/test_run.py
    sweep = {
        "base": base,
        "output_dir": "out",
        "axes": {"compress.ratio": [0.5, 0.7], "compress.include": [None, "no_such_weight"]},
        "select": {"maximize": "quality", "subject_to": {"min_speedup": 0.01}},
    }
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return folder / "sweep.yaml"


@pytest.mark.timeout(300)  # a wedged Ray must not hang CI (takes ~30 s on 2 busy cores)
def test_sweep_on_two_nodes_then_resume(
    ray_cluster: Cluster, sweep_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = sweep_file.parent / "out"
    assert cli.main(["sweep", str(sweep_file), "--address", ray_cluster.address, "-q"]) == 0
    capsys.readouterr()
    data = json.loads((out / "sweep.json").read_text())
    trials = data["trials"]
    assert [(t["params"]["compress.ratio"], t["params"]["compress.include"]) for t in trials] == [
        (0.5, None), (0.5, "no_such_weight"), (0.7, None), (0.7, "no_such_weight"),
    ]  # fmt: skip
    done = [t for t in trials if t["status"] == "done"]
    failed = [t for t in trials if t["status"] == "failed"]
    assert len(done) == 2 and len(failed) == 2
    for t in failed:  # recorded as one line, the sweep went on
        assert "matches no weight" in t["error"] and "\n" not in t["error"]
        assert (out / "trials" / t["id"] / "error.log").is_file()
    for t in done:
        assert t["metric"] == "accuracy_percent" and t["speedup"] > 0
        assert (out / "trials" / t["id"] / "benchmark" / "report.json").is_file()
    assert len({t["node"] for t in trials}) == 2  # both nodes ran trials
    # Shared stages ran once, as a job of their own (sweeps.shared): the first trial started
    # from its folder and calibrated; the trials after it started from the first one's folder.
    leader, follower = done
    shared = out / "shared" / trials[0]["id"]
    assert {s.name for s in shared.iterdir() if s.is_dir()} >= {"export", "reference"}
    assert not (shared / "compress").exists()
    shared_stages = {"export", "data", "reference", "reference-scores"}
    assert set(leader["reused_stages"]) == shared_stages  # it calibrated and compressed itself
    assert shared_stages | {"calibrate"} <= set(follower["reused_stages"])
    assert "compress" not in follower["reused_stages"]
    export = shared / "export" / "model.onnx"
    for trial in (leader, follower):
        linked = out / "trials" / trial["id"] / "export" / "model.onnx"
        assert linked.stat().st_ino == export.stat().st_ino

    best_id = data["selection"]["best"]
    assert best_id in {t["id"] for t in done}
    assert (out / "sweep.md").read_text().count("failed: ConfigError") == 2
    assert (out / "sweep.png").stat().st_size > 1000
    best = load_config(out / "best.yaml")
    assert best.compress.include is None
    assert (
        best.compress.ratio
        == next(t for t in done if t["id"] == best_id)["params"]["compress.ratio"]
    )

    # Interrupted sweep: one trial lost its result; a rerun runs only that trial.
    stamps = {t["id"]: (out / "trials" / t["id"] / "trial.json").stat().st_mtime_ns for t in trials}
    (out / "trials" / follower["id"] / "trial.json").unlink()
    result = factorlm.sweep(sweep_file, address=ray_cluster.address)
    assert result.ran == [follower["id"]]
    assert result.trial(follower["id"]).ok
    for ident, stamp in stamps.items():
        if ident != follower["id"]:
            assert (out / "trials" / ident / "trial.json").stat().st_mtime_ns == stamp
    # its own stages were still there: the rerun only re-read them
    assert {"export", "compress", "build", "benchmark"} <= set(
        result.trial(follower["id"]).reused_stages
    )

    # Everything finished: a stricter rule needs no Ray and exits 1 when no trial meets it.
    strict = yaml.safe_load(sweep_file.read_text())
    strict["select"]["subject_to"]["min_speedup"] = 1000.0
    (sweep_file.parent / "strict.yaml").write_text(yaml.safe_dump(strict))
    assert cli.main(["sweep", str(sweep_file.parent / "strict.yaml")]) == 1
    assert "no trial meets the rule" in " ".join(capsys.readouterr().err.split())
    assert not (out / "best.yaml").exists()


@pytest.mark.timeout(300)
def test_interrupted_sweep_cancels_running_trials_and_resumes(
    ray_cluster: Cluster, sweep_file: Path
) -> None:
    from factorlm.sweeps import load_sweep, run_sweep

    spec = yaml.safe_load(sweep_file.read_text())
    spec["output_dir"] = "out-interrupted"
    spec["axes"] = {"compress.ratio": [0.5, 0.6, 0.7]}
    path = sweep_file.parent / "interrupted.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    config = load_sweep(path)
    finished: list[str] = []

    def stop_after_two(result: factorlm.sweeps.TrialResult) -> None:
        finished.append(result.id)
        if len(finished) == 2:  # the third trial is still running (both nodes were busy)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, address=ray_cluster.address, on_trial=stop_after_two)
    out = sweep_file.parent / "out-interrupted"
    assert not (out / "sweep.json").exists()
    ids = [t.id for t in config.trials()]
    stored = {i for i in ids if (out / "trials" / i / "trial.json").exists()}
    # the cancelled trial left no result (unless it finished in the same instant)
    assert set(finished) <= stored and len(stored) in (2, 3)

    result = run_sweep(config, address=ray_cluster.address)
    assert result.ran == [i for i in ids if i not in stored]
    assert all(r.ok for r in result.trials)
    assert json.loads((out / "sweep.json").read_text())["counts"]["resumed"] == len(stored)
