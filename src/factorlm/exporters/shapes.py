"""Model inputs and the shape ranges an engine is built for.

TensorRT builds one kernel plan per optimization profile: for every dynamic input it needs a
minimum, an optimum and a maximum shape. Users write them as ``name:min,opt,max`` with ``x``
between dimensions (``input_ids:1x16,8x128,32x512``); anything left out is derived from the
model's dynamic axes, and inputs that share a symbolic axis (``batch_size``, ``sequence_length``)
get the same range, so ``input_ids`` and ``attention_mask`` never disagree. All of this is plain
Python so it is tested without TensorRT.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from factorlm.errors import ConfigError, ModelLoadError

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_SEQUENCE",
    "ModelInput",
    "ShapeRange",
    "derive_shapes",
    "load_onnx",
    "model_inputs",
    "parse_shapes",
    "validate_shapes",
]

logger = logging.getLogger(__name__)

#: Default (min, opt, max) of a batch axis.
DEFAULT_BATCH: tuple[int, int, int] = (1, 8, 32)
#: Default (min, opt, max) of any other dynamic axis (sequence length, past length).
DEFAULT_SEQUENCE: tuple[int, int, int] = (1, 128, 512)

Dim = int | str | None
Shape = tuple[int, ...]


def load_onnx(path: str | os.PathLike[str], *, load_external_data: bool = False) -> onnx.ModelProto:
    """Read an ONNX file, turning every way it can be wrong into one ``ModelLoadError`` sentence."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p} does not exist.")
    if not p.is_file():
        raise ModelLoadError(f"{p} is not a file; pass the path of a .onnx model.")
    try:
        model = onnx.load(str(p), load_external_data=load_external_data)
    except DecodeError as exc:
        raise ModelLoadError(
            f"{p} is not an ONNX model (it does not parse as ModelProto)."
        ) from exc
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"{p} cannot be read as an ONNX model: {exc}.") from exc
    # Arbitrary bytes sometimes parse as an empty protobuf message: demand a real graph.
    if model.ir_version <= 0 or not model.graph.output or not model.opset_import:
        raise ModelLoadError(f"{p} is not an ONNX model (no graph, outputs or opset).")
    return model


@dataclass(frozen=True)
class ModelInput:
    """A graph input: its name, element type and dims (int fixed, str symbolic, None unknown)."""

    name: str
    elem_type: int
    dims: tuple[Dim, ...]

    @property
    def dtype(self) -> str:
        """The element type's numpy-style name, e.g. ``int64``."""
        return str(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))

    @property
    def shape(self) -> tuple[Dim, ...]:
        """``dims`` under the name ``_common.text.text_feeds`` reads (as on an ORT input)."""
        return self.dims

    @property
    def is_dynamic(self) -> bool:
        """True when at least one axis is not a fixed positive size."""
        return any(not isinstance(d, int) for d in self.dims)


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    """The graph's real inputs (initializers listed as inputs by old exporters are skipped)."""
    initializers = {init.name for init in model.graph.initializer}
    result = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims: list[Dim] = []
        for d in tensor.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(None)
        result.append(ModelInput(value.name, tensor.elem_type, tuple(dims)))
    return result


@dataclass(frozen=True)
class ShapeRange:
    """The (min, opt, max) shapes of one input in an optimization profile."""

    name: str
    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ConfigError(
                f"Shapes of {self.name!r} have different ranks: "
                f"{_fmt(self.min)}, {_fmt(self.opt)}, {_fmt(self.max)}."
            )
        for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True):
            if not 0 < lo <= mid <= hi:
                raise ConfigError(
                    f"Shapes of {self.name!r} must satisfy 0 < min <= opt <= max on every axis, "
                    f"got {_fmt(self.min)}, {_fmt(self.opt)}, {_fmt(self.max)}."
                )

    def to_spec(self) -> str:
        """The ``name:min,opt,max`` form that :func:`parse_shapes` reads back."""
        return f"{self.name}:{_fmt(self.min)},{_fmt(self.opt)},{_fmt(self.max)}"

    def to_json(self) -> dict[str, list[int]]:
        """A JSON-friendly dict for manifests."""
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def _fmt(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


_DIMS = re.compile(r"^\d+(x\d+)*$")


def _parse_dims(text: str, entry: str) -> Shape:
    text = text.strip().lower()
    if not _DIMS.match(text):
        raise ConfigError(
            f"Malformed shape {text!r} in {entry!r}; write dimensions as integers joined by 'x', "
            "e.g. input_ids:1x16,8x128,32x512."
        )
    return tuple(int(d) for d in text.split("x"))


def parse_shapes(specs: str | Sequence[str] | None) -> dict[str, ShapeRange]:
    """Parse ``name:min,opt,max`` entries (separated by spaces or ``;``, or given as a list).

    A single shape (``name:8x128``) fixes the input: min = opt = max.
    """
    if specs is None:
        return {}
    items = [specs] if isinstance(specs, str) else list(specs)
    entries = [e for item in items for e in re.split(r"[;\s]+", item) if e]
    ranges: dict[str, ShapeRange] = {}
    for entry in entries:
        name, sep, rest = entry.rpartition(":")
        if not sep or not name:
            raise ConfigError(
                f"Malformed shapes entry {entry!r}; expected name:min,opt,max, "
                "e.g. input_ids:1x16,8x128,32x512."
            )
        parts = rest.split(",")
        if len(parts) not in (1, 3):
            raise ConfigError(
                f"Shapes entry {entry!r} has {len(parts)} shapes; give one (fixed) or three "
                "(min,opt,max)."
            )
        shapes = [_parse_dims(part, entry) for part in parts]
        lo, mid, hi = (shapes * 3)[:3] if len(shapes) == 1 else shapes
        if name in ranges:
            raise ConfigError(f"Input {name!r} is given more than one shape range.")
        ranges[name] = ShapeRange(name, lo, mid, hi)
    return ranges


def validate_shapes(ranges: Mapping[str, ShapeRange], inputs: Sequence[ModelInput]) -> None:
    """Check every range against the model: the input exists, ranks agree, fixed axes match.

    Inputs that share a symbolic axis must also be given the same range on it.
    """
    by_name = {inp.name: inp for inp in inputs}
    seen: dict[str, tuple[int, int, int, str]] = {}
    for name, rng in ranges.items():
        if name not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            raise ConfigError(
                f"Shapes name input {name!r}, which the model does not have (inputs: {known})."
            )
        inp = by_name[name]
        if len(rng.min) != len(inp.dims):
            raise ConfigError(
                f"Shapes of {name!r} have rank {len(rng.min)} but the model's input has rank "
                f"{len(inp.dims)} ({_fmt_dims(inp.dims)})."
            )
        for axis, dim in enumerate(inp.dims):
            triple = (rng.min[axis], rng.opt[axis], rng.max[axis])
            if isinstance(dim, int) and triple != (dim, dim, dim):
                raise ConfigError(
                    f"Axis {axis} of {name!r} is fixed to {dim} in the model, but the shapes ask "
                    f"for {triple[0]}..{triple[2]}."
                )
            if isinstance(dim, str):
                if dim in seen and seen[dim][:3] != triple:
                    other = seen[dim][3]
                    raise ConfigError(
                        f"Axis {dim!r} is shared by {other!r} and {name!r} but their shapes give it "
                        f"different ranges ({seen[dim][:3]} vs {triple})."
                    )
                seen[dim] = (*triple, name)


def _fmt_dims(dims: Iterable[Dim]) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def _is_batch_axis(dim: Dim, axis: int) -> bool:
    if isinstance(dim, str):
        return "batch" in dim.lower()
    return axis == 0


def derive_shapes(
    inputs: Sequence[ModelInput],
    given: Mapping[str, ShapeRange] | None = None,
    *,
    batch: tuple[int, int, int] | None = None,
    sequence: tuple[int, int, int] | None = None,
) -> dict[str, ShapeRange]:
    """A complete profile: the given ranges, plus a range for every other input.

    Symbolic axes take the range some given input already fixed for them; otherwise batch-like
    axes get ``batch`` (default 1, 8, 32) and all others ``sequence`` (default 1, 128, 512).
    """
    given = dict(given or {})
    validate_shapes(given, inputs)
    batch = batch or DEFAULT_BATCH
    sequence = sequence or DEFAULT_SEQUENCE
    by_name = {inp.name: inp for inp in inputs}
    symbols: dict[str, tuple[int, int, int]] = {}
    for name, rng in given.items():
        for axis, dim in enumerate(by_name[name].dims):
            if isinstance(dim, str):
                symbols[dim] = (rng.min[axis], rng.opt[axis], rng.max[axis])
    result: dict[str, ShapeRange] = {}
    for inp in inputs:
        if inp.name in given:
            result[inp.name] = given[inp.name]
            continue
        triples = []
        for axis, dim in enumerate(inp.dims):
            if isinstance(dim, int):
                triples.append((dim, dim, dim))
            elif isinstance(dim, str) and dim in symbols:
                triples.append(symbols[dim])
            else:
                triple = batch if _is_batch_axis(dim, axis) else sequence
                if isinstance(dim, str):
                    symbols[dim] = triple
                triples.append(triple)
        lo, mid, hi = (tuple(t[i] for t in triples) for i in range(3))
        result[inp.name] = ShapeRange(inp.name, lo, mid, hi)
        logger.info("Derived shape range %s", result[inp.name].to_spec())
    return result
