"""``factorlm build``: a thin CLI over the engine builders; user mistakes are one line, exit 2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from factorlm.cli import main
from models import mlp, write_model

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return write_model(mlp(), tmp_path / "src" / "model.onnx")


def test_ort_build_writes_engine_and_manifest(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "engine"
    assert main(["build", str(model_path), "--backend", "ort", "-o", str(out), "--int8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["int8"] and manifest["quantization"]["quantized"] == 2
    assert "int8-dynamic: 2/2 linear weights quantized" in capsys.readouterr().out
    assert main(["build", str(model_path), "-o", str(out), "--format", "ort", "--overwrite"]) == 0
    assert (out / "model.ort").is_file() and not (out / "model.onnx").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--backend", "onnx"], "'onnx' is not one of 'ort', 'tensorrt'"),
        (["--backend", "tensorrt", "--shapes", "x:1x16,8x128"], "has 2 shapes"),
        (["--backend", "tensorrt", "--shapes", "x:1xx16,1x1x32,1x1x32"], "Malformed shape"),
        (["--backend", "tensorrt", "--shapes", "ids:1x1x32,1x1x32,1x1x32"], "does not have"),
        (["--backend", "tensorrt", "--shapes", "x:1x1x8,1x1x8,1x1x8"], "fixed to 32"),
        (["--backend", "tensorrt", "--shapes", "x:1x16,8x128,32x512"], "rank 2"),
        (["--backend", "tensorrt", "--format", "ort"], "--format applies to the ort backend only"),
        (["--shapes", "x:1x1x32,1x1x32,1x1x32"], "--shapes applies to the tensorrt backend only"),
        (["--fp16", "--int8"], "cannot be combined"),
        (["--format", "tflite"], "'tflite' is not one of 'onnx', 'ort'"),
    ],
)
def test_user_mistakes_exit_2_with_one_line_and_write_nothing(
    model_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    needle: str,
) -> None:
    out = tmp_path / "engine"
    assert main(["build", str(model_path), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err.replace("\n", " ") and "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_non_onnx_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_text("definitely not protobuf")
    assert main(["build", str(bogus), "-o", str(tmp_path / "engine")]) == 2
    err = capsys.readouterr().err
    assert "is not an ONNX model" in err and "Traceback" not in err
    assert not (tmp_path / "engine").exists()


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is absent")
def test_tensorrt_backend_without_tensorrt_exits_2(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "engine"
    args = ["build", str(model_path), "--backend", "tensorrt", "-o", str(out), "--fp16"]
    assert main([*args, "--no-timing-cache"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed; install the extra with `pip install factorlm" in err
    assert not out.exists()


def test_cli_int4_and_static_int8(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--int4`` and ``--int8 --int8-mode static --data`` reach the builder; ``--int8-mode
    static`` alone, and static without ``--data``, are refused with exit 2 and one sentence."""
    out = tmp_path / "int4"
    args = ["build", str(model_path), "-o", str(out), "--int4", "--int4-block-size", "16"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["method"] == "int4"
    assert manifest["quantization"]["settings"]["block_size"] == 16
    assert "int4: 2/2 linear weights quantized" in capsys.readouterr().out
    bad = tmp_path / "bad"
    assert main(["build", str(model_path), "-o", str(bad), "--int8-mode", "static"]) == 2
    assert "but int8 is off; add --int8" in capsys.readouterr().err
    assert main(["build", str(model_path), "-o", str(bad), "--int8", "--int8-mode", "static"]) == 2
    assert "needs calibration texts: pass --data" in capsys.readouterr().err
    assert not bad.exists()
