"""The streamed export (weights written tensor by tensor) gives the plain export's model exactly.

Both exports run optimum's ``main_export`` on the same tiny real models, an encoder classifier and
a Llama decoder with past and tied embeddings; the streamed one must have the same nodes, inputs,
outputs, initializer order and values (the whole proto, once its external data is read back) and
give ONNX Runtime the same outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from factorlm.exporters import streamed
from factorlm.exporters.streamed import ALIGN, attach_weights, streamed_weights


def _main_export(source: Path, out: Path, task: str) -> None:
    from optimum.exporters.onnx import main_export

    main_export(
        str(source),
        output=str(out),
        task=task,
        device="cpu",
        dtype="fp32",
        library_name="transformers",
        local_files_only=True,
        do_validation=False,
    )


def _inline(path: Path) -> onnx.ModelProto:
    """The model with its external data read in and the external-data records cleared."""
    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        tensor.ClearField("external_data")
        tensor.data_location = onnx.TensorProto.DEFAULT
    return model


def _feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Two padded sentences; for a decoder with past, 3 random past tokens before them."""
    ids = np.array([[2, 5, 6, 7, 3], [2, 8, 9, 3, 0]], dtype=np.int64)
    nodes = session.get_inputs()
    past = 3 if any(n.name.startswith("past_key_values") for n in nodes) else 0
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for node in nodes:
        if node.name == "input_ids":
            feeds[node.name] = ids
        elif node.name == "attention_mask":
            mask = (ids != 0).astype(np.int64)
            feeds[node.name] = np.concatenate([np.ones((2, past), np.int64), mask], axis=1)
        elif node.name == "position_ids":
            feeds[node.name] = np.tile(np.arange(past, past + 5, dtype=np.int64), (2, 1))
        elif node.name == "token_type_ids":
            feeds[node.name] = np.zeros_like(ids)
        else:  # past_key_values.N.key/value: batch, kv heads, past tokens, head size
            shape = [
                d if isinstance(d, int) else 2 if d == "batch_size" else past for d in node.shape
            ]
            feeds[node.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _outputs(path: Path) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, _feeds(session)))


@pytest.mark.parametrize(
    ("fixture", "task"),
    [("tiny_bert_dir", "text-classification"), ("tiny_llama_dir", "text-generation-with-past")],
)
def test_streamed_export_is_the_plain_export(
    fixture: str, task: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source: Path = request.getfixturevalue(fixture)
    _main_export(source, tmp_path / "plain", task)
    with streamed_weights() as record:
        _main_export(source, tmp_path / "streamed", task)
    plain, ours = tmp_path / "plain" / "model.onnx", tmp_path / "streamed" / "model.onnx"
    assert record.active and record.files == [ours] and record.external_bytes > 0
    assert not (tmp_path / "plain" / "model.onnx_data").exists()  # tiny: torch writes it inline
    data = tmp_path / "streamed" / "model.onnx_data"
    assert data.is_file()

    header = onnx.load(str(ours), load_external_data=False)
    external = [t for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and ours.stat().st_size < data.stat().st_size
    # optimum's tied-weight pass (the decoder) re-saves the model into the same file, unaligned
    tied = fixture == "tiny_llama_dir"
    for tensor in external:
        entries = {e.key: e.value for e in tensor.external_data}
        assert entries["location"] == "model.onnx_data"
        assert tied or int(entries["offset"]) % ALIGN == 0

    a, b = _inline(plain), _inline(ours)
    assert [n.name for n in a.graph.node] == [n.name for n in b.graph.node]
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))
    assert a.SerializeToString() == b.SerializeToString()  # nothing else differs either

    for x, y in zip(_outputs(plain), _outputs(ours), strict=True):
        np.testing.assert_array_equal(x, y)
    # The swaps are undone after the block: the next export is the plain one again.
    _main_export(source, tmp_path / "after", task)
    assert not (tmp_path / "after" / "model.onnx_data").exists()


def test_attach_weights_puts_the_values_back_and_refuses_an_unknown_input(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.randn(3, 64)
    path = tmp_path / "m.onnx"
    torch.onnx.export(layer, (x,), str(path), export_params=False, input_names=["x"], dynamo=False)
    header = onnx.load(str(path))
    params = dict(layer.named_parameters())
    assert {i.name for i in header.graph.input} == {"x", *params}  # weights are inputs

    missing = {k: v for k, v in params.items() if k != "2.bias"}
    with pytest.raises(RuntimeError, match=r"\['2.bias'\] that are neither"):
        attach_weights(path, missing, inputs=("x",))

    written = attach_weights(path, params, inputs=("x",))
    assert written == 4 * 64 * 32  # the other tensors are under 1024 bytes and stay inline
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["x"]
    assert {t.name for t in model.graph.initializer} == set(params)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, layer(x).numpy(), rtol=1e-5, atol=1e-6)


def test_unavailable_torch_internals_fall_back_to_the_plain_export(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streamed, "_TORCH_EXPORTER", "torch.onnx._no_such_exporter")
    with streamed_weights() as record:
        _main_export(tiny_bert_dir, tmp_path / "out", "text-classification")
    assert not record.active and record.files == []
    assert not (tmp_path / "out" / "model.onnx_data").exists()
    assert len(_outputs(tmp_path / "out" / "model.onnx")) == 1


def test_export_writes_the_weights_beside_the_graph(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from factorlm.exporters.hf import export

    result = export(tiny_bert_dir, tmp_path / "onnx", task="text-classification", progress=False)
    assert (result.model.parent / "model.onnx_data").is_file()
    assert result.max_relative <= 1e-3  # validated against PyTorch through the external data
    header: Any = onnx.load(str(result.model), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
