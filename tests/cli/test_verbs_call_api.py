"""The CLI verbs are thin: each builds its options object and hands it to the API unchanged.

The API functions are replaced by recorders that stop the verb (a ConfigError -> exit 2) once
they have seen their arguments, so no model is compressed, built or trained here.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import onnx
import pytest

from factorlm import cli
from factorlm.errors import ConfigError
from factorlm.options import BuildOptions, CompressOptions, RecoverOptions
from models import mlp


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(mlp(64, 192, 48), str(path))
    return path


def _recorder(seen: dict[str, Any]) -> Any:
    def record(*args: Any, **kwargs: Any) -> Any:
        seen["args"], seen["kwargs"] = args, kwargs
        raise ConfigError("recorded")

    return record


def test_compress_passes_one_compress_options(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import factorlm.compression

    seen: dict[str, Any] = {}
    monkeypatch.setattr(factorlm.compression, "compress", _recorder(seen))
    argv = ["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--method", "svd"]
    assert cli.main([*argv, "--ratio", "0.4", "--no-joint-qkv", "--rank-multiple", "4"]) == 2
    opts = seen["args"][2]
    assert opts == CompressOptions(method="svd", ratio=0.4, joint_qkv=False, rank_multiple=4)
    assert set(seen["kwargs"]) == {"stats", "progress", "data", "tokenizer"}
    assert seen["kwargs"]["data"] is None  # the texts go along only for the sequential refit


def test_build_passes_one_build_options(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import factorlm.exporters.engine

    seen: dict[str, Any] = {}
    monkeypatch.setattr(factorlm.exporters.engine, "build_engine", _recorder(seen))
    argv = ["build", str(model), "-o", str(tmp_path / "e"), "--int8", "--no-optimize"]
    assert cli.main(argv) == 2
    assert seen["args"][2] == BuildOptions(int8=True, optimize=False)
    assert seen["kwargs"]["reference"] is None and seen["kwargs"]["timing_cache_file"] is None


def test_recover_passes_one_recover_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import factorlm.recovery

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "bert"}\n')
    seen: dict[str, Any] = {}
    monkeypatch.setattr(factorlm.recovery, "recover", _recorder(seen))
    argv = ["recover", str(hf), "--plan", str(tmp_path / "p.json"), "--data", str(tmp_path / "d")]
    argv += ["-o", str(tmp_path / "out"), "--steps", "7", "--time-budget", "2m", "--lr", "0.01"]
    assert cli.main(argv) == 2
    assert seen["args"][3] == RecoverOptions(steps=7, time_budget_s=120.0, lr=0.01)
    assert seen["kwargs"]["data"] == tmp_path / "d"


@pytest.mark.parametrize(("flags", "force"), [([], False), (["--force"], True)])
def test_run_force_reaches_run_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], force: bool
) -> None:
    import factorlm.cli.run as verb

    seen: dict[str, Any] = {}

    def fake(config: Any, **kwargs: Any) -> Any:
        seen.update(kwargs, output_dir=config.output_dir)
        return SimpleNamespace(passed=True)

    monkeypatch.setattr(verb, "run_pipeline", fake)
    monkeypatch.setattr(verb, "_summary", lambda result, console: None)
    assert cli.main(["run", "-o", str(tmp_path / "job"), *flags]) == 0
    assert seen["force"] is force and seen["output_dir"] == tmp_path / "job"
