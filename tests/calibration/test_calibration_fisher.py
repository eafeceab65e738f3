"""collect_fisher against per-sample gradients computed directly with PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from factorlm.calibration import collect_fisher
from factorlm.calibration.fisher import map_to_onnx
from factorlm.errors import DataError

DATA = [
    ("the film is a good movie", "pos"),
    ("bad plot and awful actor", "neg"),
    ("great funny clever story", "pos"),
    ("boring long worst movie", "neg"),
    ("the best quiet film", "pos"),
]


def test_fisher_matches_per_sample_gradients(
    tiny_bert_dir: Path, tiny_bert_onnx: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in DATA))
    onnx_path, names = tiny_bert_onnx

    fisher = collect_fisher(
        tiny_bert_dir, onnx_path, data, cache_dir=tmp_path / "cache", progress=False
    )
    assert set(fisher) == set(names)

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    params = dict(model.named_parameters())
    expected = {n: np.zeros(params[p].shape[0]) for n, p in names.items()}
    for text, label in DATA:
        model.zero_grad()
        enc = tok([text], return_tensors="pt")
        logits = model(**enc).logits
        loss = torch.nn.functional.cross_entropy(
            logits, torch.tensor([model.config.label2id[label]])
        )
        loss.backward()
        for n, p in names.items():
            expected[n] += (params[p].grad.double() ** 2).sum(dim=1).numpy()
    for n in names:
        assert fisher[n].shape == expected[n].shape
        np.testing.assert_allclose(fisher[n], expected[n], rtol=1e-6, atol=1e-12)

    # Cached: a second call reads the file and gives the same arrays.
    again = collect_fisher(
        tiny_bert_dir, onnx_path, data, cache_dir=tmp_path / "cache", progress=False
    )
    for n in names:
        np.testing.assert_array_equal(again[n], fisher[n])


def test_mapping_by_value_and_name(
    tiny_bert_dir: Path, tiny_bert_onnx: tuple[Path, dict[str, str]]
) -> None:
    onnx_path, names = tiny_bert_onnx
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    params = {n: p.detach().numpy() for n, p in model.named_parameters() if p.ndim == 2}
    mapping = map_to_onnx(onnx.load(str(onnx_path)), params)
    assert {k: v[0] for k, v in mapping.items()} == names
    assert all(transposed for k, (_, transposed) in mapping.items() if k.startswith("onnx::"))


def test_fisher_bad_labels(
    tiny_bert_dir: Path, tiny_bert_onnx: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    onnx_path, _ = tiny_bert_onnx
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "good film", "label": "pos"}) + "\n")
    with pytest.raises(DataError, match="only one label"):
        collect_fisher(tiny_bert_dir, onnx_path, one, cache_dir=tmp_path, progress=False)
    odd = tmp_path / "odd.jsonl"
    odd.write_text(
        json.dumps({"text": "good", "label": "pos"})
        + "\n"
        + json.dumps({"text": "bad", "label": "meh"})
        + "\n"
    )
    with pytest.raises(DataError, match="'meh'"):
        collect_fisher(tiny_bert_dir, onnx_path, odd, cache_dir=tmp_path, progress=False)
    nolabel = tmp_path / "nolabel.jsonl"
    nolabel.write_text(json.dumps({"text": "good"}) + "\n")
    with pytest.raises(DataError, match="no column 'label'"):
        collect_fisher(tiny_bert_dir, onnx_path, nolabel, cache_dir=tmp_path, progress=False)


@pytest.mark.slow
def test_real_minilm_fisher_with_probe(tmp_path: Path) -> None:
    from factorlm.assets import exported_minilm, minilm_dir, reviews_path
    from factorlm.calibration import find_targets

    model = exported_minilm()
    fisher = collect_fisher(
        minilm_dir(), model, reviews_path(), labels=["fresh", "rotten"], max_samples=16,
        cache_dir=tmp_path, progress=False,
    )  # fmt: skip
    targets = {t.weight: t for t in find_targets(onnx.load(str(model), load_external_data=False))}
    assert set(fisher) == set(targets)  # every linear weight mapped (transposed copies)
    for name, values in fisher.items():
        assert values.shape == (targets[name].out_features,)
        assert np.all(values >= 0) and values.sum() > 0


def test_fisher_samples_takes_the_first_texts(
    tiny_bert_dir: Path, tiny_bert_onnx: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """``fisher_samples`` runs the backward pass on the first N calibration texts only: the
    Fisher equals the one of a data file holding just those texts, and differs from all five."""
    from factorlm.calibration.requested import collect_requested
    from factorlm.options import CompressOptions

    onnx_path, names = tiny_bert_onnx
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in DATA))
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in DATA[:2]))

    def fisher(path: Path, **options: object) -> dict[str, np.ndarray]:
        opts = CompressOptions(method="fwsvd", **options)  # type: ignore[arg-type]
        stats = collect_requested(onnx_path, path, opts, torch_folder=lambda why: tiny_bert_dir)
        assert stats is not None
        return stats.fisher

    limited = fisher(data, fisher_samples=2)
    direct = fisher(first)
    everything = fisher(data)
    assert set(limited) == set(names)
    for name in names:
        np.testing.assert_allclose(limited[name], direct[name], rtol=1e-6, atol=1e-12)
    assert any(not np.allclose(limited[n], everything[n]) for n in names)
    # more than the calibration texts: all of them, no error
    capped = fisher(data, fisher_samples=50)
    for name in names:
        np.testing.assert_allclose(capped[name], everything[name], rtol=1e-6, atol=1e-12)
