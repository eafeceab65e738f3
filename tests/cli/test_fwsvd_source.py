"""fwsvd from the CLI finds the PyTorch weights through the export record, without --hf-model.

``factorlm export`` writes ``factorlm-export.json`` (source folder, task, versions) beside
model.onnx; it is a sidecar, so compressed models and engines carry it; ``compress --method
fwsvd`` reads it when ``--hf-model`` is not given, and says in one sentence what is missing
when neither is there.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import onnx
import pytest

from factorlm import cli
from factorlm._common.files import EXPORT_RECORD, SIDECAR_FILES, copy_sidecars
from factorlm.cli.compress import _torch_folder
from factorlm.errors import ConfigError
from factorlm.exporters.hf import export_source
from models import mlp
from tiny_vocab import WORDS


def _onnx(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(mlp(8, 16, 4), str(path))
    return path


def test_source_folder_comes_from_the_record_and_travels_with_the_sidecars(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"")
    model = _onnx(tmp_path / "onnx")
    assert EXPORT_RECORD in SIDECAR_FILES
    assert export_source(model) is None
    with pytest.raises(ConfigError, match=r"no export record .*pass --hf-model"):
        _torch_folder(None, model)

    (model.parent / EXPORT_RECORD).write_text(json.dumps({"source": str(hf)}))
    assert export_source(model) == export_source(model.parent) == hf
    assert _torch_folder(None, model) == hf
    copied = _onnx(tmp_path / "compressed")  # what compress/build do with the input's sidecars
    assert copy_sidecars(model.parent, copied.parent) == [EXPORT_RECORD]
    assert _torch_folder(None, copied) == hf

    (hf / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=f"export record names {hf}, which holds none"):
        _torch_folder(None, copied)


def test_fwsvd_runs_from_an_export_without_hf_model(
    tmp_path: Path, tiny_bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "onnx"
    assert (
        cli.main(["export", str(tiny_bert_dir), "-o", str(out), "--task", "text-classification"])
        == 0
    )
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["source"] == str(tiny_bert_dir.resolve())
    assert record["task"] == "text-classification" and "factorlm" in record["versions"]

    rng = random.Random(0)
    rows = [
        {"text": " ".join(rng.choices(WORDS, k=6)), "label": ("neg", "pos")[i % 2]}
        for i in range(16)
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["compress", str(out / "model.onnx"), "-o", str(tmp_path / "c"), "--method", "fwsvd"]
    argv += ["--data", str(data), "--min-size", "0", "--ratio", "0.95", "--rank-multiple", "1"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    plan = json.loads((tmp_path / "c" / "model.plan.json").read_text())
    assert "fwsvd" in {w["method"] for w in plan["weights"].values()}
    assert (tmp_path / "c" / EXPORT_RECORD).is_file()
