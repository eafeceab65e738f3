"""Shape ranges: parsing ``name:min,opt,max``, checking them against a model, deriving defaults."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from factorlm.errors import ConfigError, ModelLoadError
from factorlm.exporters.shapes import (
    DEFAULT_BATCH,
    DEFAULT_SEQUENCE,
    ShapeRange,
    derive_shapes,
    load_onnx,
    model_inputs,
    parse_shapes,
    validate_shapes,
)
from models import mlp


def bert_like() -> onnx.ModelProto:
    """Three inputs sharing batch/sequence axes, one fixed-width input and an unnamed axis."""
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch_size", "sequence_length"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    inputs.append(helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch_size", 3]))
    inputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [None, None]))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["y"])],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["batch_size", "sequence_length"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_parse_three_shapes_and_a_fixed_one() -> None:
    ranges = parse_shapes("input_ids:1x16,8x128,32x512;attention_mask:4x64")
    assert ranges["input_ids"] == ShapeRange("input_ids", (1, 16), (8, 128), (32, 512))
    assert ranges["attention_mask"].min == ranges["attention_mask"].max == (4, 64)
    assert parse_shapes(["a:1,2,3", "b:2x2,2x2,2x2"])["a"].opt == (2,)
    assert parse_shapes(ranges["input_ids"].to_spec()) == {"input_ids": ranges["input_ids"]}
    assert parse_shapes(None) == {}


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("input_ids", "expected name:min,opt,max"),
        (":1x2,1x2,1x2", "expected name:min,opt,max"),
        ("input_ids:1x16,8x128", "has 2 shapes"),
        ("input_ids:1x16,8xa,32x512", "Malformed shape '8xa'"),
        ("input_ids:1x16,8x128,32x-1", "Malformed shape"),
        ("input_ids:1x16,8x128,32", "different ranks"),
        ("input_ids:8x16,1x128,32x512", "min <= opt <= max"),
        ("input_ids:0x16,1x128,32x512", "min <= opt <= max"),
        ("a:1,1,1 a:2,2,2", "more than one shape range"),
    ],
)
def test_malformed_shapes_name_the_problem(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as info:
        parse_shapes(spec)
    assert "\n" not in str(info.value)


def test_model_inputs_reads_fixed_symbolic_and_unknown_axes() -> None:
    inputs = {i.name: i for i in model_inputs(bert_like())}
    assert inputs["input_ids"].dims == ("batch_size", "sequence_length")
    assert inputs["pixels"].dims == ("batch_size", 3)
    assert inputs["extra"].dims == (None, None)
    assert inputs["input_ids"].dtype == "int64" and inputs["input_ids"].is_dynamic


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nope:1x1,1x1,1x1", "does not have"),
        ("input_ids:1,8,32", "rank 1 but the model's input has rank 2"),
        ("pixels:1x4,2x4,4x4", "fixed to 3"),
        ("input_ids:1x16,8x128,32x512 attention_mask:1x16,8x64,32x512", "shared by"),
    ],
)
def test_shapes_outside_the_model_are_refused(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        validate_shapes(parse_shapes(spec), model_inputs(bert_like()))


def test_derived_profile_shares_symbolic_axes_with_given_ranges() -> None:
    inputs = model_inputs(bert_like())
    profile = derive_shapes(inputs, parse_shapes("input_ids:1x16,4x64,16x256"))
    for name in ("attention_mask", "token_type_ids"):
        assert (profile[name].min, profile[name].opt, profile[name].max) == (
            (1, 16),
            (4, 64),
            (16, 256),
        )
    assert profile["pixels"] == ShapeRange("pixels", (1, 3), (4, 3), (16, 3))
    # Unnamed axes: axis 0 is a batch, others a sequence.
    assert profile["extra"].max == (DEFAULT_BATCH[2], DEFAULT_SEQUENCE[2])


def test_defaults_without_any_given_range() -> None:
    profile = derive_shapes(model_inputs(bert_like()))
    assert profile["input_ids"].to_spec() == "input_ids:1x1,8x128,32x512"
    assert profile["attention_mask"] == ShapeRange(
        "attention_mask", *((DEFAULT_BATCH[i], DEFAULT_SEQUENCE[i]) for i in range(3))
    )
    custom = derive_shapes(model_inputs(mlp()), batch=(1, 2, 4), sequence=(2, 8, 16))
    assert custom["x"] == ShapeRange("x", (1, 2, 32), (2, 8, 32), (4, 16, 32))


def test_load_onnx_refuses_what_is_not_a_model(tmp_path: Path) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("hello, this is not a protobuf at all\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path, needle in (
        (text, "not an ONNX model"),
        (empty, "not an ONNX model"),
        (tmp_path / "missing.onnx", "does not exist"),
        (tmp_path, "is not a file"),
    ):
        with pytest.raises(ModelLoadError, match=needle):
            load_onnx(path)
    good = tmp_path / "mlp.onnx"
    onnx.save(mlp(), good)
    assert load_onnx(good).graph.name == "mlp"
