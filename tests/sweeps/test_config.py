"""Sweep files: unknown keys named with a suggestion, axes checked against the run config schema,
every trial validated before anything runs, and the CLI's exit statuses for user errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from factorlm import cli
from factorlm.errors import BackendUnavailableError, ConfigError
from factorlm.sweeps import load_sweep, parse_sweep
from factorlm.sweeps.config import axis_keys


def _sweep(**extra: object) -> dict[str, object]:
    return {"axes": {"compress.ratio": [0.5, 0.7]}, **extra}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_sweep(selct={}), "unknown key 'selct'; did you mean 'select'?"),
        (
            _sweep(select={"maximize": "quality", "subject_to": {"min_sped": 1.5}}),
            "unknown key 'select.subject_to.min_sped'; did you mean 'min_speedup'?",
        ),
        (_sweep(ray={"adress": "auto"}), "unknown key 'ray.adress'; did you mean 'address'?"),
        ({"axs": {"compress.ratio": [0.5]}}, "unknown key 'axs'; did you mean 'axes'?"),
        ({"base": {}}, "'axes' is missing"),
        (
            {"axes": {"compress.methd": ["svd"]}},
            "axis 'compress.methd' is not an option of the run config; did you mean "
            "'compress.method'?",
        ),
        ({"axes": {"compress": ["svd"]}}, "axis 'compress' is a section of the run config"),
        ({"axes": {"output_dir": ["a", "b"]}}, "axis 'output_dir' cannot be swept"),
        ({"axes": {"compress.ratio": []}}, "axis 'compress.ratio' has no values"),
        ({"axes": {"compress.ratio": [0.5, 0.5]}}, "lists a value twice"),
        (
            {"axes": {"compress.ratio": [0.5, 1.5]}},
            "(trial compress.ratio=1.5): 'compress.ratio' is invalid: Input should be less than 1",
        ),
        (
            {"axes": {"compress.method": ["svd", "magic"]}},
            "(trial compress.method='magic'): 'compress.method' is invalid",
        ),
        (
            _sweep(select={"maximize": "quality", "pareto": True}),
            "give exactly one of maximize, minimize or pareto: true (got maximize, pareto)",
        ),
        (_sweep(select={"maximize": "perplexity"}), "'select.maximize' is invalid"),
        (_sweep(base={"compres": {}}), "sweep base: unknown key 'compres'"),
        ([1, 2], "the top level must be a mapping"),
    ],
)
def test_bad_sweep_is_one_sentence(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_sweep(data)
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text


def test_axis_keys_are_the_run_config_leaves() -> None:
    keys = axis_keys()
    assert {"compress.method", "compress.ratio", "build.int8", "recover.method"} <= set(keys)
    assert "benchmark.goals.min_speedup" in keys
    assert "compress" not in keys and "benchmark.goals" not in keys


def test_base_file_paths_resolve_against_their_folder(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text("model: m\ndata:\n  path: d.jsonl\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "base": "cfg/run.yaml",
                "output_dir": "out",
                "axes": {"compress.ratio": [0.5], "compress.plan": ["plan.json"]},
            }
        )
    )
    config = load_sweep(sweep)
    assert config.output_dir == tmp_path / "out"
    (trial,) = config.trials()
    assert trial.config.model == tmp_path / "cfg" / "m"
    assert trial.config.data.path == tmp_path / "cfg" / "d.jsonl"
    assert trial.config.compress.plan == tmp_path / "plan.json"  # axis values: the sweep's folder
    assert load_sweep(sweep, output_dir=tmp_path / "o2").output_dir == tmp_path / "o2"


def test_cli_axis_not_in_schema_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("axes:\n  compress.raito: [0.5, 0.7]\n")
    assert cli.main(["sweep", str(sweep), "-o", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "axis 'compress.raito' is not an option of the run config" in err
    assert "did you mean 'compress.ratio'?" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_missing_file_and_typo_are_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("axes:\n  compress.ratio: [0.5]\nselect:\n  maximise: quality\n")
    assert cli.main(["sweep", str(sweep)]) == 2
    assert "did you mean 'maximize'?" in capsys.readouterr().err


def test_missing_ray_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import factorlm

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("axes:\n  compress.ratio: [0.5]\n")
    assert cli.main(["sweep", str(sweep)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "pip install 'factorlm[ray]'" in err and "Traceback" not in err
    with pytest.raises(BackendUnavailableError, match=r"factorlm\[ray\]"):
        factorlm.sweep({"axes": {"compress.ratio": [0.5]}})


def test_api_function_survives_importing_the_package() -> None:
    import inspect

    import factorlm
    import factorlm.sweeps.run  # must not rebind factorlm.sweep

    assert inspect.isfunction(factorlm.sweep)
    assert list(inspect.signature(factorlm.sweep).parameters)[:2] == ["config", "output_dir"]


def test_example_sweep_file_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "minilm-sweep.yaml"
    config = load_sweep(example)
    trials = config.trials()
    assert len(trials) == 12
    assert config.select.maximize == "quality"
    assert config.select.subject_to.min_speedup == 1.3
    assert {t.config.compress.method for t in trials} == {"svd", "whiten"}


def test_unreachable_cluster_is_one_sentence_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")
    sweep = tmp_path / "sweep.yaml"
    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "d.txt").write_text("a text\n")
    sweep.write_text("base: {model: m.onnx, data: {path: d.txt}}\naxes:\n  compress.ratio: [0.5]\n")
    assert cli.main(["sweep", str(sweep), "--address", "127.0.0.1:1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Cannot reach the Ray cluster at 127.0.0.1:1" in err and "Traceback" not in err


def test_missing_model_is_exit_2_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")
    (tmp_path / "d.txt").write_text("a text\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {data: {path: d.txt}}\naxes:\n  model: [m1.onnx, m2.onnx]\n")
    assert cli.main(["sweep", str(sweep)]) == 2
    assert "m1.onnx does not exist" in " ".join(capsys.readouterr().err.split())
