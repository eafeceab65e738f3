"""factorlm export: a real optimum export validated against PyTorch, and refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from factorlm.cli import main
from factorlm.errors import ConfigError, ModelLoadError
from factorlm.exporters.hf import check_model_dir, export


def test_not_a_model_folder_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a Hugging Face model folder (no config.json)" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_refusals(tmp_path: Path, tiny_bert_dir: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="has no weights"):
        check_model_dir(tmp_path)
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(
        json.dumps({"model_type": "my_arch", "auto_map": {"AutoModel": "x.Y"}})
    )
    (remote / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        check_model_dir(remote)
    with pytest.raises(ConfigError, match="Unknown task"):
        export(tiny_bert_dir, tmp_path / "o", task="translation")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="--overwrite"):
        export(tiny_bert_dir, busy)
    assert (busy / "keep.txt").read_text() == "x"


def test_tiny_classifier_export_matches_pytorch(tmp_path: Path, tiny_bert_dir: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "onnx"
    result = export(tiny_bert_dir, out, task="text-classification", progress=False)
    assert result.model == out / "model.onnx"
    assert {c.name for c in result.checks} == {"logits"}
    assert result.max_relative <= 1e-3
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".onnx.*"))  # no staging folder left behind
    # Independent check on other inputs than the validator's.
    ids = np.array([[2, 4, 5, 6, 7, 3, 0, 0], [2, 8, 9, 10, 11, 12, 13, 3]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    session = ort.InferenceSession(str(result.model), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got = session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    with torch.inference_mode():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_real_minilm_export_validates_against_pytorch(tmp_path: Path) -> None:
    from factorlm.assets import minilm_dir

    result = export(minilm_dir(), tmp_path / "minilm", task="feature-extraction", progress=False)
    (check,) = result.checks
    assert check.name == "last_hidden_state"
    assert check.max_abs_diff < 1e-4  # measured 1.9e-6 on a scale of 5.8
    assert check.relative < 1e-5
    assert (tmp_path / "minilm" / "vocab.txt").is_file()
