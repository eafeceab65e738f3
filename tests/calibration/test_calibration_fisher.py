"""collect_fisher against per-sample gradients computed directly with PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

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


def _onnx_of(model_dir: Path, out: Path) -> dict[str, str]:
    """An ONNX graph holding the model's linear weights the way exporters store them.

    Most as transposed ``onnx::MatMul_*`` copies (matched by value), one under its PyTorch name
    in a Gemm with transB=1 (matched by name). Returns ONNX name -> PyTorch name.
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    linear = {
        f"{name}.weight": module.weight.detach().numpy()
        for name, module in model.named_modules()
        if module.__class__.__name__ == "Linear"
    }
    nodes, inits, inputs, outputs, expected = [], [], [], [], {}
    for i, (name, w) in enumerate(sorted(linear.items())):
        x, y = f"x{i}", f"y{i}"
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [None, w.shape[1]]))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [None, w.shape[0]]))
        if i == 0:
            inits.append(numpy_helper.from_array(w, name))
            nodes.append(helper.make_node("Gemm", [x, name], [y], transB=1))
            expected[name] = name
        else:
            init = f"onnx::MatMul_{100 + i}"
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), init))
            nodes.append(helper.make_node("MatMul", [x, init], [y]))
            expected[init] = name
    graph = helper.make_graph(nodes, "weights", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(proto, str(out))
    return expected


def test_fisher_matches_per_sample_gradients(tiny_bert_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in DATA))
    onnx_path = tmp_path / "model.onnx"
    names = _onnx_of(tiny_bert_dir, onnx_path)

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


def test_mapping_by_value_and_name(tiny_bert_dir: Path, tmp_path: Path) -> None:
    names = _onnx_of(tiny_bert_dir, tmp_path / "m.onnx")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    params = {n: p.detach().numpy() for n, p in model.named_parameters() if p.ndim == 2}
    mapping = map_to_onnx(onnx.load(str(tmp_path / "m.onnx")), params)
    assert {k: v[0] for k, v in mapping.items()} == names
    assert all(transposed for k, (_, transposed) in mapping.items() if k.startswith("onnx::"))


def test_fisher_bad_labels(tiny_bert_dir: Path, tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    _onnx_of(tiny_bert_dir, onnx_path)
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
