"""Synthetic inputs for latency and fidelity: the shape grid and feeds that fit a model's inputs.

A shape is ``BATCHxSEQUENCE``. Dimension roles follow the conventions of Hugging Face exports:
the first axis of every input is the batch, the second axis of a token input (``input_ids``,
``attention_mask``, ``token_type_ids``, ``position_ids`` or any other rank >= 2 input) is the
sequence, and the third axis of a KV-cache input (``past_key_values.*``, ``*cache*``) is the past
length, fed as 0 so a decoder exported with past runs as a plain prefill. Token ids are drawn
uniformly below the vocabulary size read from the graph (the Gather that consumes them) so that
random feeds never index out of range.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from factorlm._common.text import is_past_input
from factorlm.bench.runners import TensorMeta
from factorlm.errors import ConfigError

__all__ = [
    "DEFAULT_SEQUENCE",
    "Shape",
    "check_shape",
    "default_shapes",
    "is_past_input",
    "make_feeds",
    "parse_shapes",
    "vocab_size_of",
]

logger = logging.getLogger(__name__)

DEFAULT_SEQUENCE = 128
_DEFAULT_BATCHES = (1, 8)
_SHAPE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Shape:
    """One point of the latency grid."""

    batch: int
    seq: int

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.seq}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        match = _SHAPE.match(text)
        if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
            raise ConfigError(
                f"Shape {text!r} is not BATCHxSEQUENCE with positive sizes, e.g. 8x128."
            )
        return cls(int(match.group(1)), int(match.group(2)))


def parse_shapes(texts: Iterable[str | Shape]) -> list[Shape]:
    """Parse ``["1x128", "8x128"]`` (or comma-joined strings) into shapes, dropping duplicates."""
    shapes: list[Shape] = []
    for item in texts:
        parts = [item] if isinstance(item, Shape) else [p for p in item.split(",") if p.strip()]
        for part in parts:
            shape = part if isinstance(part, Shape) else Shape.parse(part)
            if shape not in shapes:
                shapes.append(shape)
    if not shapes:
        raise ConfigError("The shape list is empty; give at least one BATCHxSEQUENCE.")
    return shapes


def _main_input(inputs: Sequence[TensorMeta]) -> TensorMeta:
    for meta in inputs:
        if meta.name == "input_ids":
            return meta
    plain = [m for m in inputs if not is_past_input(m.name)]
    return (plain or list(inputs))[0]


def default_shapes(inputs: Sequence[TensorMeta]) -> list[Shape]:
    """The grid a user gets without ``--shapes``: batch 1 and 8 at sequence 128 where axes are free."""
    main = _main_input(inputs)
    batch_dim = main.shape[0] if main.shape else 1
    seq_dim = main.shape[1] if len(main.shape) > 1 else 1
    seq = seq_dim if isinstance(seq_dim, int) and seq_dim > 0 else DEFAULT_SEQUENCE
    if isinstance(batch_dim, int) and batch_dim > 0:
        return [Shape(batch_dim, seq)]
    return [Shape(b, seq) for b in _DEFAULT_BATCHES]


def check_shape(inputs: Sequence[TensorMeta], shape: Shape) -> None:
    """Reject a grid point that contradicts a static axis of the model."""
    main = _main_input(inputs)
    dims = list(main.shape)
    if dims and isinstance(dims[0], int) and dims[0] > 0 and dims[0] != shape.batch:
        raise ConfigError(
            f"Shape {shape.label} does not fit input {main.name}, whose batch axis is fixed at {dims[0]}."
        )
    if len(dims) > 1 and isinstance(dims[1], int) and dims[1] > 0 and dims[1] != shape.seq:
        raise ConfigError(
            f"Shape {shape.label} does not fit input {main.name}, whose sequence axis is fixed at "
            f"{dims[1]}."
        )


def _resolve_dims(meta: TensorMeta, shape: Shape) -> tuple[int, ...]:
    dims: list[int] = []
    past = is_past_input(meta.name)
    for axis, dim in enumerate(meta.shape):
        if isinstance(dim, int) and dim >= 0:
            dims.append(dim)
        elif axis == 0:
            dims.append(shape.batch)
        elif past and axis == 2:
            dims.append(0)
        elif not past and axis == 1:
            dims.append(shape.seq)
        else:
            dims.append(1)
    return tuple(dims)


def make_feeds(
    inputs: Sequence[TensorMeta],
    shape: Shape,
    *,
    rng: np.random.Generator,
    vocab_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Random but valid feeds for every input at one grid point (KV caches empty)."""
    check_shape(inputs, shape)
    vocab = vocab_size or 100
    feeds: dict[str, np.ndarray] = {}
    for meta in inputs:
        dims = _resolve_dims(meta, shape)
        dtype = np.dtype(meta.dtype)
        name = meta.name.lower()
        if dtype.kind == "f":
            value = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind == "b" or "attention_mask" in name or name.endswith("mask"):
            value = np.ones(dims, dtype=dtype)
        elif "position" in name and len(dims) == 2:
            value = np.broadcast_to(np.arange(dims[1], dtype=dtype), dims).copy()
        elif "input_ids" in name or (name.endswith("ids") and "type" not in name):
            value = rng.integers(0, vocab, size=dims).astype(dtype)
        else:
            value = np.zeros(dims, dtype=dtype)
        feeds[meta.name] = value
    return feeds


def vocab_size_of(model_file: Path, input_name: str = "input_ids") -> int | None:
    """Vocabulary size: rows of the embedding table gathered by ``input_name``, else config.json."""
    model_file = Path(model_file)
    config = model_file.parent / "config.json"
    if config.is_file():
        try:
            size = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
            if isinstance(size, int) and size > 0:
                return size
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
    if model_file.suffix != ".onnx":
        return None
    try:
        import onnx

        model = onnx.load(str(model_file), load_external_data=False)
    except Exception:  # an unreadable graph is reported by the runner, not here
        return None
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    sizes = [
        shapes[node.input[0]][0]
        for node in model.graph.node
        if node.op_type == "Gather"
        and len(node.input) > 1
        and node.input[1] == input_name
        and node.input[0] in shapes
        and shapes[node.input[0]]
    ]
    return min(sizes) if sizes else None
