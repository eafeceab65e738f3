"""factorlm.io: unsafe or malformed inputs are refused in one sentence; saves are atomic and checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper

from factorlm.errors import ModelLoadError
from factorlm.io import load_model, save_model
from models import mlp, run_ort


def _external(tmp_path: Path, location: str = "weights.bin") -> Path:
    model = mlp()
    external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location=location, size_threshold=0
    )
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path))
    return path


def test_round_trip_preserves_model(tmp_path: Path) -> None:
    src = tmp_path / "in.onnx"
    proto = mlp()
    onnx.save_model(proto, str(src))
    model = load_model(src)
    out = tmp_path / "sub" / "out.onnx"
    assert save_model(model, out) == [out]
    saved = onnx.load(str(out))
    assert saved.opset_import == proto.opset_import
    assert {p.key: p.value for p in saved.metadata_props} == {
        "author": "tests",
        "purpose": "factorization",
    }
    assert [i.name for i in saved.graph.input] == ["x"]
    assert saved.graph.input[0].type == proto.graph.input[0].type
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_external_data_on_request_and_from_external_input(tmp_path: Path) -> None:
    src = _external(tmp_path)
    model = load_model(src)
    out = tmp_path / "o" / "out.onnx"
    written = save_model(model, out, external_data=True)
    assert written == [out, out.parent / "out.onnx.data"]
    x = np.random.default_rng(0).standard_normal((2, 3, 32)).astype(np.float32)
    ref = run_ort(str(src), {"x": x})[0]
    np.testing.assert_array_equal(run_ort(str(out), {"x": x})[0], ref)
    # An input with external data saved without it embeds the weights.
    inline = tmp_path / "o" / "inline.onnx"
    assert save_model(load_model(src), inline, external_data=False) == [inline]
    np.testing.assert_array_equal(run_ort(str(inline), {"x": x})[0], ref)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello, this is text\n", "is not an ONNX file"),
        (b"", "is empty"),
    ],
)
def test_refuses_non_onnx(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_refuses_truncated_and_missing(tmp_path: Path) -> None:
    data = mlp().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")


def test_refuses_missing_or_short_external_data(tmp_path: Path) -> None:
    path = _external(tmp_path)
    data = tmp_path / "weights.bin"
    content = data.read_bytes()
    data.write_bytes(content[:10])
    with pytest.raises(ModelLoadError, match="is truncated"):
        load_model(path)
    data.unlink()
    with pytest.raises(ModelLoadError, match="is missing"):
        load_model(path)


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd"])
def test_refuses_external_data_outside_folder(tmp_path: Path, location: str) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    model = mlp()
    for tensor in model.graph.initializer:
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", location
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
    path = inner / "evil.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="model's folder"):
        load_model(path)
