"""``factorlm bench``: exit 0/1 from goals, one sentence and exit 2 for every usage error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factorlm.cli import main

FAST = ["--shapes", "2x16", "--iterations", "5", "--warmup", "1", "--no-html"]


def _bench(models: dict[str, Path], out: Path, candidate: str, *extra: str) -> int:
    return main(
        [
            "bench",
            "-r",
            str(models["ref"]),
            "-c",
            str(models[candidate]),
            "-o",
            str(out),
            *FAST,
            *extra,
        ]
    )


def test_exit_status_follows_the_goals(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _bench(models, tmp_path / "ok", "noisy", "--max-fidelity-loss", "0.5") == 0
    assert {p.name for p in (tmp_path / "ok").iterdir()} == {
        "report.json",
        "report.md",
        "junit.xml",
    }
    assert _bench(models, tmp_path / "bad", "slow", "--min-speedup", "1.0") == 1
    out = capsys.readouterr().out
    assert "FAIL slow min-speedup 1x" in out
    assert json.loads((tmp_path / "bad" / "report.json").read_text())["passed"] is False


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    text = " ".join(err.split())
    for needle in needles:
        assert needle in text, text


def test_models_whose_inputs_or_outputs_differ(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _bench(models, tmp_path / "o", "typed") == 2
    _one_line_error(
        capsys, "Candidate typed's inputs do not match reference ref's (unexpected token_type_ids)."
    )
    assert _bench(models, tmp_path / "o", "renamed") == 2
    _one_line_error(capsys, "outputs do not match", "missing last_hidden_state")


def test_data_without_labels_for_classification(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "w1 w2"}\n{"text": "w3"}\n')
    assert (
        _bench(models, tmp_path / "o", "noisy", "--data", str(data), "--task", "classification")
        == 2
    )
    _one_line_error(capsys, "has no label on every row, which the classification task needs.")
    assert _bench(models, tmp_path / "o", "noisy", "--max-accuracy-drop", "1") == 2
    _one_line_error(capsys, "Goal max-accuracy-drop needs labelled data")


def test_unreadable_baseline(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "report.json"
    broken.write_text("{not json")
    assert _bench(models, tmp_path / "o", "noisy", "--baseline", str(broken)) == 2
    _one_line_error(capsys, f"Baseline report {broken} is unreadable")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "something-else"}))
    assert _bench(models, tmp_path / "o", "noisy", "--baseline", str(other)) == 2
    _one_line_error(capsys, "is not a factorlm bench report.json")
    assert _bench(models, tmp_path / "o", "noisy", "--baseline", str(tmp_path / "nope.json")) == 2
    _one_line_error(capsys, "does not exist")
    assert not (tmp_path / "o").exists()  # nothing is written before the inputs are valid


def test_baseline_flow_through_the_cli(models: dict[str, Path], tmp_path: Path) -> None:
    assert _bench(models, tmp_path / "base", "noisy") == 0
    baseline = str(tmp_path / "base" / "report.json")
    assert (
        _bench(
            models, tmp_path / "again", "noisy", "--baseline", baseline, "--max-regression", "300%"
        )
        == 0
    )
    assert (
        _bench(models, tmp_path / "slow", "slow", "--baseline", baseline, "--max-regression", "5%")
        == 1
    )


def test_bad_options_exit_2(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "bench",
                "-r",
                str(models["ref"]),
                "-c",
                str(models["noisy"]),
                "-o",
                str(tmp_path),
                "--shapes",
                "8by128",
            ]
        )
        == 2
    )
    _one_line_error(capsys, "--shapes has '8by128'; write BATCHxSEQUENCE")
    assert _bench(models, tmp_path, "noisy", "--task", "translation", "--data", str(tmp_path)) == 2
    _one_line_error(capsys, "'translation' is not one of 'auto'")
    assert (
        main(
            [
                "bench",
                "-r",
                str(tmp_path / "missing"),
                "-c",
                str(models["noisy"]),
                "-o",
                str(tmp_path),
            ]
        )
        == 2
    )
    _one_line_error(capsys, "does not exist")
