"""Every compression method runs from the CLI with its default options on the real MiniLM (slow).

``factorlm compress`` on the exported all-MiniLM-L6-v2 with ``--method M --data reviews.jsonl``
and nothing else but a small calibration sample: the data-aware methods collect their
statistics (fwsvd its Fisher, from the PyTorch weights and the review labels), the output
folder carries config and tokenizer, loads in onnxruntime and computes an approximation of the
original's embeddings (closer than noise, not identical).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from factorlm.cli import main
from factorlm.options import METHODS

pytestmark = pytest.mark.slow

#: Small, so the whole file stays in minutes; whiten/drone need more tokens than the FFN's
#: 1536 input features, which 64 reviews give.
CALIBRATION_ROWS = 64


@pytest.fixture(scope="module")
def minilm() -> Path:
    """``model.onnx`` of all-MiniLM-L6-v2, exported once into the factorlm cache."""
    from factorlm.assets import exported_minilm

    return exported_minilm()


@pytest.fixture(scope="module")
def reviews() -> Path:
    from factorlm.assets import reviews_path

    return Path(reviews_path())


@pytest.fixture(scope="module")
def feeds(minilm: Path, reviews: Path) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    lines = reviews.read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines[-8:]]  # not calibration rows
    tokenizer = AutoTokenizer.from_pretrained(minilm.parent)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in batch.items()}


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_from_the_cli_with_defaults(
    method: str,
    minilm: Path,
    reviews: Path,
    feeds: dict[str, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / method
    argv = ["compress", str(minilm), "-o", str(out), "--method", method, "--data", str(reviews)]
    argv += ["--calibration-samples", str(CALIBRATION_ROWS)]
    # fwsvd: the export holds no PyTorch weights; its factorlm-export.json names the folder that
    # does, so no --hf-model is needed.
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    names = ("model.onnx", "model.plan.json", "config.json", "tokenizer.json", "vocab.txt")
    for name in (*names, "factorlm-export.json"):  # the export record travels with the model
        assert (out / name).is_file(), name
    plan = json.loads((out / "model.plan.json").read_text())
    assert plan["weights"], "nothing was factorized"
    assert {w["method"] for w in plan["weights"].values()} <= {method, "svd"}
    assert plan["totals"]["params_after"] < plan["totals"]["params_before"]

    reference, got = _run(minilm, feeds), _run(out / "model.onnx", feeds)
    assert got.shape == reference.shape and np.isfinite(got).all()
    rel = np.linalg.norm(got - reference) / np.linalg.norm(reference)
    assert 0 < rel < 1, rel  # an approximation of the original, not noise, not a copy


def test_output_folder_loads_in_ortmodel(
    minilm: Path, feeds: dict[str, np.ndarray], tmp_path: Path
) -> None:
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    out = tmp_path / "svd"
    assert main(["compress", str(minilm), "-o", str(out), "--method", "svd", "-q"]) == 0
    model = ORTModelForFeatureExtraction.from_pretrained(out)
    hidden = model(**{k: v for k, v in feeds.items()}).last_hidden_state
    np.testing.assert_allclose(
        np.asarray(hidden), _run(out / "model.onnx", feeds), rtol=1e-4, atol=1e-5
    )
