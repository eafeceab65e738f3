"""``factorlm compress --loss-aware / --sequential / --shrinkage auto`` end to end on the tiny
exported Llama (its export record names the PyTorch folder the output Fisher needs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from factorlm import cli
from factorlm.planning import load_plan
from tiny_vocab import LONG_TEXTS

TEXTS = LONG_TEXTS * 6


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def _argv(model: Path, out: Path, data: Path) -> list[str]:
    return [
        "compress", str(model), "-o", str(out), "--data", str(data), "--ratio", "0.5",
        "--min-size", "256", "--rank-multiple", "4", "--max-length", "16", "--batch-size", "3",
    ]  # fmt: skip


@pytest.mark.parametrize("extra", [[], ["--output-gram"]])
def test_loss_aware_sequential_shrinkage_compress(
    tiny_llama_past: Path, tmp_path: Path, data: Path, extra: list[str]
) -> None:
    out = tmp_path / "out" / "model.onnx"
    argv = [
        *_argv(tiny_llama_past, out, data),
        "--loss-aware",
        "--sequential",
        "--shrinkage",
        "auto",
        *extra,
    ]
    assert cli.main(argv) == 0
    plan = load_plan(out.with_name("model.plan.json"))
    assert plan.weights and all(e.method == "whiten" for e in plan.weights.values())


def test_loss_aware_without_pytorch_weights_is_one_sentence(
    tiny_llama_past: Path, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lone = tmp_path / "lone"
    lone.mkdir()
    names = ("model.onnx", "model.onnx_data", "tokenizer.json", "tokenizer_config.json")
    for name in (*names, "config.json"):
        if (tiny_llama_past.parent / name).exists():
            shutil.copy2(tiny_llama_past.parent / name, lone / name)
    out = tmp_path / "out2" / "model.onnx"
    assert cli.main([*_argv(lone / "model.onnx", out, data), "--loss-aware"]) == 2
    err = capsys.readouterr().err
    assert "--loss-aware" in err and "Traceback" not in err
    assert not out.exists()


def test_sequential_with_another_method_is_refused(
    tiny_llama_past: Path, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out3" / "model.onnx"
    argv = [*_argv(tiny_llama_past, out, data), "--method", "asvd", "--sequential"]
    assert cli.main(argv) == 2
    assert "use method whiten" in capsys.readouterr().err
    assert not out.exists()


def test_output_gram_needs_loss_aware(
    tiny_llama_past: Path, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out4" / "model.onnx"
    assert cli.main([*_argv(tiny_llama_past, out, data), "--output-gram"]) == 2
    assert "output-gram refines" in capsys.readouterr().err


def test_generated_samples_join_the_calibration(
    tiny_llama_past: Path, tmp_path: Path, data: Path
) -> None:
    out = tmp_path / "out5" / "model.onnx"
    argv = [*_argv(tiny_llama_past, out, data), "--generated-samples", "6", "--loss-aware"]
    assert cli.main(argv) == 0
    assert out.is_file()
