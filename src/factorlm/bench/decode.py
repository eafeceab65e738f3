"""Decoders with a KV cache: prefill and decode-step feeds, the decode latency grid, greedy decoding.

A model exported with ``text-generation-with-past`` takes ``input_ids`` (batch, new tokens),
``attention_mask`` (batch, past + new), ``position_ids`` (batch, new) and one
``past_key_values.<layer>.<key|value>`` input (batch, kv heads, past, head dim) per cache tensor,
and returns ``logits`` plus one ``present.*`` output per cache tensor (past + new along axis 2).
Carrying ``present.*`` into ``past_key_values.*`` is what makes a decode step cost one token's
work instead of the whole sequence's.

- ``decoder_layout`` finds that structure in a runner's inputs and outputs (None for encoders and
  decoders exported without past).
- ``step_feeds`` builds the feeds of one step from token ids, the full mask and the cache:
  positions are the cumulative mask minus one, sliced to the new tokens (right after a prefill of
  ``n`` tokens, the next token sits at position ``n``), exactly as transformers computes them.
- ``DecodePoint`` / ``decode_grid`` / ``point_feeds``: the latency grid. A prefill point runs
  ``seq`` prompt tokens with an empty cache; a decode point runs one new token per sequence
  against a cache of ``past`` positions. Cache values are random (the cost of attention does not
  depend on them); token ids are random below the vocabulary size.
- ``greedy_generate``: argmax decoding of a fixed number of tokens for one prompt, cache carried
  between steps, timed end to end (feeds, inference and argmax).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from factorlm._common.text import input_dtype, is_past_input
from factorlm.bench.runners import BaseRunner, TensorMeta
from factorlm.errors import ConfigError, ModelLoadError

__all__ = [
    "DecodePoint",
    "DecoderLayout",
    "GenerationRun",
    "decode_grid",
    "decoder_layout",
    "greedy_generate",
    "max_positions_of",
    "point_feeds",
    "step_feeds",
]

logger = logging.getLogger(__name__)

Phase = Literal["prefill", "decode"]


@dataclass(frozen=True)
class DecoderLayout:
    """Where a decoder keeps its cache: past inputs, the present output of each, the logits."""

    past: tuple[TensorMeta, ...]
    present: Mapping[str, str]  # past input name -> present output name
    logits: str

    def cache_shape(self, meta: TensorMeta, batch: int, length: int) -> tuple[int, ...]:
        """(batch, heads, length, head dim) of one past input; heads and head dim are static."""
        dims: list[int] = []
        for axis, dim in enumerate(meta.shape):
            if axis == 0:
                dims.append(batch)
            elif axis == 2:
                dims.append(length)
            elif isinstance(dim, int) and dim >= 0:
                dims.append(dim)
            else:
                raise ModelLoadError(f"Input {meta.name} has no static head shape (axis {axis}).")
        return tuple(dims)

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """Past length 0: what a prefill gets."""
        return {
            m.name: np.zeros(self.cache_shape(m, batch, 0), dtype=input_dtype(m)) for m in self.past
        }

    def random_cache(
        self, batch: int, length: int, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """A cache of ``length`` positions with random values (latency does not depend on them)."""
        return {
            m.name: rng.standard_normal(self.cache_shape(m, batch, length)).astype(input_dtype(m))
            for m in self.past
        }

    def carry(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next step's cache: every ``present.*`` output fed back as its ``past_key_values.*``."""
        return {name: outputs[present] for name, present in self.present.items()}


def decoder_layout(
    inputs: Sequence[TensorMeta], outputs: Sequence[TensorMeta]
) -> DecoderLayout | None:
    """The cache layout of a decoder exported with past; None for any other model."""
    names = {m.name for m in inputs}
    past = tuple(
        m
        for m in inputs
        if is_past_input(m.name) and "use_cache" not in m.name and len(m.shape) == 4
    )
    if "input_ids" not in names or not past:
        return None
    out_names = [m.name for m in outputs]
    logits = "logits" if "logits" in out_names else out_names[0]
    cache_outputs = [n for n in out_names if "present" in n.lower()]
    present: dict[str, str] = {}
    for meta in past:
        guess = meta.name.replace("past_key_values", "present")
        if guess in cache_outputs:
            present[meta.name] = guess
    if len(present) != len(past):  # no naming convention: pair them in order
        if len(cache_outputs) != len(past):
            raise ModelLoadError(
                f"The model has {len(past)} KV-cache inputs but {len(cache_outputs)} present "
                "outputs; factorlm cannot carry its cache between decode steps."
            )
        present = {m.name: out for m, out in zip(past, cache_outputs, strict=True)}
    return DecoderLayout(past=past, present=present, logits=logits)


def step_feeds(
    inputs: Sequence[TensorMeta],
    ids: np.ndarray,
    mask: np.ndarray,
    cache: Mapping[str, np.ndarray],
    model_name: str = "the model",
) -> dict[str, np.ndarray]:
    """Feeds of one step: ``ids`` (batch, new), ``mask`` (batch, past + new), the cache."""
    ids = np.asarray(ids)
    mask = np.asarray(mask)
    new = ids.shape[1]
    past_length = mask.shape[1] - new
    feeds: dict[str, np.ndarray] = {}
    for meta in inputs:
        name = meta.name
        dtype = input_dtype(meta)
        if name == "input_ids":
            feeds[name] = ids.astype(dtype)
        elif name == "attention_mask":
            feeds[name] = mask.astype(dtype)
        elif "use_cache" in name:  # merged decoders: take the with-past branch once there is one
            shape = [d if isinstance(d, int) else 1 for d in meta.shape]
            feeds[name] = np.full(shape, past_length > 0, dtype=dtype)
        elif name in cache:
            feeds[name] = np.asarray(cache[name]).astype(dtype, copy=False)
        elif "position" in name:
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -new:]
            feeds[name] = positions.astype(dtype)
        elif name == "token_type_ids":
            feeds[name] = np.zeros(ids.shape, dtype=dtype)
        else:
            raise ModelLoadError(
                f"{model_name} has an input {name!r} that a decode step cannot feed."
            )
    return feeds


@dataclass(frozen=True, order=True)
class DecodePoint:
    """One point of the decoder latency grid: a prefill of ``seq`` tokens or a decode step."""

    phase: Phase
    batch: int
    seq: int
    past: int

    @property
    def tokens(self) -> int:
        """Tokens processed per inference (ms/token and tokens/s are per these)."""
        return self.batch * self.seq

    @property
    def label(self) -> str:
        if self.phase == "prefill":
            return f"prefill {self.batch}x{self.seq}"
        return f"decode {self.batch}x1 past {self.past}"


def decode_grid(
    prefill_lengths: Sequence[int],
    decode_past: Sequence[int],
    decode_batches: Sequence[int],
    *,
    max_positions: int | None = None,
) -> list[DecodePoint]:
    """Prefill at batch 1 for every prompt length, then one decode step per (batch, past)."""
    points = [DecodePoint("prefill", 1, int(n), 0) for n in prefill_lengths]
    points += [
        DecodePoint("decode", int(b), 1, int(p)) for b in decode_batches for p in decode_past
    ]
    if max_positions is not None:
        too_long = [p.label for p in points if p.past + p.seq > max_positions]
        if too_long:
            raise ConfigError(
                f"Decoder latency points {', '.join(too_long)} exceed the model's "
                f"{max_positions} positions (max_position_embeddings)."
            )
    return points


def max_positions_of(folder: Path | None) -> int | None:
    """``max_position_embeddings`` from the config.json beside a model, if there is one."""
    path = Path(folder) / "config.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def point_feeds(
    inputs: Sequence[TensorMeta],
    layout: DecoderLayout,
    point: DecodePoint,
    *,
    rng: np.random.Generator,
    vocab_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Random token ids, a full mask and a random cache of ``point.past`` positions."""
    ids = rng.integers(0, vocab_size or 100, size=(point.batch, point.seq), dtype=np.int64)
    mask = np.ones((point.batch, point.past + point.seq), dtype=np.int64)
    if point.past:
        cache = layout.random_cache(point.batch, point.past, rng)
    else:
        cache = layout.empty_cache(point.batch)
    return step_feeds(inputs, ids, mask, cache)


@dataclass
class GenerationRun:
    """The new token ids of one greedy run and its end-to-end seconds."""

    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0


def greedy_generate(
    runner: BaseRunner,
    layout: DecoderLayout,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int] = (),
) -> GenerationRun:
    """Argmax decoding for one prompt (batch 1): a prefill, then one step per new token.

    Stops after ``max_new_tokens`` or right after emitting a token in ``eos_ids`` (empty: never).
    """
    if not prompt:
        raise ConfigError("A generation prompt tokenized to no tokens.")
    start = time.perf_counter()
    ids = np.asarray([list(prompt)], dtype=np.int64)
    mask = np.ones_like(ids)
    cache = layout.empty_cache(1)
    run = GenerationRun()
    stops = set(eos_ids)
    for _ in range(max_new_tokens):
        outputs = runner.infer(step_feeds(runner.inputs, ids, mask, cache, runner.name))
        token = int(np.argmax(outputs[layout.logits][0, -1]))
        run.tokens.append(token)
        if token in stops:
            break
        cache = layout.carry(outputs)
        ids = np.asarray([[token]], dtype=np.int64)
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
    run.seconds = time.perf_counter() - start
    return run
