"""One way from text to ONNX Runtime feeds: find the tokenizer, tokenize, build the feeds.

Why one path: calibration statistics and benchmark metrics must describe the model on the same
token ids, masks and positions; two tokenizers (``tokenizers`` here, ``transformers`` there) or
two feed builders could differ in padding, truncation or position ids without any error. Both
``calibration.capture`` and ``benchmark.tasks`` call only this module.

- Tokenizer: an explicit folder (or a file in it) if given, else the first candidate folder
  (usually the ONNX model's own; ``export`` writes the tokenizer next to ``model.onnx``) that holds
  tokenizer files. ``tokenizer.json`` is read with the ``tokenizers`` library (the same Rust code
  ``transformers`` fast tokenizers wrap, without the 5-20 s import); other formats go through
  ``transformers.AutoTokenizer``.
- Batches are right-padded with the pad token (else EOS, else UNK), truncated to ``max_length``
  by the tokenizer itself so special tokens survive; arrays are int64.
- Feeds: token inputs from the tokenizer (cast to the input's dtype), ``token_type_ids`` zeros
  when the tokenizer gave none, ``position_ids`` = cumulative mask - 1, ``use_cache`` False and
  every KV-cache input empty (past length 0, so a decoder exported with past runs as a prefill).
  Any other input is refused: random values would give a plausible but meaningless number.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from factorlm.errors import DataError, ModelLoadError

__all__ = [
    "TOKENIZER_FILES",
    "TextTokenizer",
    "batch_feeds",
    "find_tokenizer",
    "input_dtype",
    "is_past_input",
    "load_hf_tokenizer",
    "text_feeds",
]

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "float32",  # numpy has no bfloat16; ORT refuses it either way
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def find_tokenizer(*places: Path | str | None, explicit: Path | str | None = None) -> Path:
    """The tokenizer folder: ``explicit`` if given, else the first of ``places`` holding one.

    A file (e.g. ``model.onnx``) stands for its folder. Raises ``DataError`` naming where it
    looked, so the user knows to pass the tokenizer folder.
    """
    if explicit is not None:
        folder = Path(explicit)
        folder = folder.parent if folder.is_file() else folder
        if not _has_tokenizer(folder):
            raise DataError(f"No tokenizer found in {folder} (given); pass a tokenizer folder.")
        return folder
    tried: list[Path] = []
    for place in places:
        if place is None:
            continue
        folder = Path(place)
        folder = folder.parent if folder.is_file() else folder
        if folder in tried:
            continue
        tried.append(folder)
        if _has_tokenizer(folder):
            return folder
    where = ", ".join(str(f) for f in tried) or "no folder"
    raise DataError(f"No tokenizer found in {where}; pass the tokenizer folder explicitly.")


def load_hf_tokenizer(folder: Path) -> Any:
    """A ``transformers`` tokenizer that can pad (pad falls back to EOS, as for decoders).

    Only for code that feeds PyTorch (Fisher estimation); ONNX feeds use ``TextTokenizer``.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for a bad folder
        raise DataError(f"The tokenizer in {folder} could not be loaded ({exc}).") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


class TextTokenizer:
    """Batch tokenization to int64 arrays, right-padded and truncated; whole-text encoding."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self._fast: Any = None
        self._slow: Any = None
        tokenizer_json = self.folder / "tokenizer.json"
        if tokenizer_json.is_file():
            from tokenizers import Tokenizer

            try:
                self._fast = Tokenizer.from_file(str(tokenizer_json))
            except Exception as exc:
                raise DataError(f"{tokenizer_json} could not be loaded ({exc}).") from exc
            self._fast.no_padding()
            self._fast.no_truncation()
            self.pad_id = self._pad_token_id()
        else:
            self._slow = load_hf_tokenizer(self.folder)
            self.pad_id = int(self._slow.pad_token_id or 0)

    def _special(self, name: str) -> str | None:
        for file in ("tokenizer_config.json", "special_tokens_map.json"):
            path = self.folder / file
            if path.is_file():
                value = json.loads(path.read_text(encoding="utf-8")).get(name)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    return value
        return None

    def _pad_token_id(self) -> int:
        for name in ("pad_token", "eos_token", "unk_token"):
            token = self._special(name)
            if token is not None and self._fast.token_to_id(token) is not None:
                return int(self._fast.token_to_id(token))
        return 0

    def __call__(self, texts: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
        """``input_ids``, ``attention_mask`` and ``token_type_ids`` (batch, longest) int64."""
        if self._slow is not None:
            enc = self._slow(
                list(texts), padding=True, truncation=True, max_length=max_length,
                return_tensors="np",
            )  # fmt: skip
            out = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
            out.setdefault("token_type_ids", np.zeros_like(out["input_ids"]))
            return out
        # The tokenizer's own truncation keeps room for the special tokens ([CLS] ... [SEP]).
        self._fast.enable_truncation(max_length)
        try:
            encodings = self._fast.encode_batch(list(texts))
        finally:
            self._fast.no_truncation()
        longest = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), longest), dtype=np.int64)
        types = np.zeros((len(encodings), longest), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            mask[row, :n] = 1
            types[row, :n] = encoding.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def encode(self, text: str) -> np.ndarray:
        """All token ids of one long text (special tokens included, no truncation): perplexity."""
        if self._slow is not None:
            return np.asarray(self._slow(text)["input_ids"], dtype=np.int64).reshape(-1)
        return np.asarray(self._fast.encode(text).ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens skipped (the generation task and API)."""
        values = [int(i) for i in ids]
        if self._slow is not None:
            return str(self._slow.decode(values, skip_special_tokens=True))
        return str(self._fast.decode(values, skip_special_tokens=True))

    def token_id(self, name: str) -> int | None:
        """Id of a special token named in the tokenizer config (e.g. ``eos_token``), if any."""
        if self._slow is not None:
            value = getattr(self._slow, f"{name}_id", None)
            return int(value) if isinstance(value, int) else None
        token = self._special(name)
        found = self._fast.token_to_id(token) if token is not None else None
        return int(found) if found is not None else None


def is_past_input(name: str) -> bool:
    """A KV-cache input (``past_key_values.*``, ``*cache*``), fed with past length 0."""
    lowered = name.lower()
    return "past" in lowered or "cache" in lowered


def input_dtype(meta: Any) -> np.dtype[Any]:
    """numpy dtype of an ORT ``NodeArg`` (``.type``) or a benchmark ``TensorMeta`` (``.dtype``)."""
    dtype = getattr(meta, "dtype", None)
    if isinstance(dtype, str | np.dtype):
        return np.dtype(dtype)
    ort_type = str(getattr(meta, "type", "tensor(float)"))
    if ort_type not in _ORT_TYPES:
        raise ModelLoadError(f"Input {meta.name} has type {ort_type}, which factorlm cannot feed.")
    return np.dtype(_ORT_TYPES[ort_type])


def _empty_past(meta: Any, batch: int, model_name: str) -> np.ndarray:
    """(batch, heads, 0, head_dim): every axis but batch and past length must be static."""
    dims: list[int] = []
    for axis, dim in enumerate(meta.shape):
        if axis == 0:
            dims.append(batch)
        elif axis == 2:
            dims.append(0)
        elif isinstance(dim, int) and dim >= 0:
            dims.append(dim)
        else:
            raise ModelLoadError(f"{model_name} input {meta.name} has no static head shape.")
    return np.zeros(tuple(dims), dtype=input_dtype(meta))


def text_feeds(
    inputs: Sequence[Any], tokens: Mapping[str, np.ndarray], model_name: str = "the model"
) -> dict[str, np.ndarray]:
    """ORT feeds for a text model from tokenizer output (see the module docstring).

    ``inputs`` are ``session.get_inputs()`` or ``TensorMeta``s; ``tokens`` holds ``input_ids``
    and ``attention_mask`` (and maybe ``token_type_ids``) as integer arrays.
    """
    ids = np.asarray(tokens["input_ids"])
    mask = np.asarray(tokens.get("attention_mask", np.ones_like(ids)))
    feeds: dict[str, np.ndarray] = {}
    for meta in inputs:
        name = meta.name
        dtype = input_dtype(meta)
        if name in tokens:
            feeds[name] = np.asarray(tokens[name]).astype(dtype)
        elif name == "attention_mask":
            feeds[name] = mask.astype(dtype)
        elif name == "token_type_ids":
            feeds[name] = np.zeros(ids.shape, dtype=dtype)
        elif "use_cache" in name:
            feeds[name] = np.zeros([d if isinstance(d, int) else 1 for d in meta.shape], dtype)
        elif "position" in name and not is_past_input(name):
            feeds[name] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(dtype)
        elif is_past_input(name):
            feeds[name] = _empty_past(meta, ids.shape[0], model_name)
        else:
            raise ModelLoadError(
                f"{model_name} has an input {name!r} that factorlm cannot feed from text."
            )
    return feeds


def batch_feeds(
    inputs: Sequence[Any],
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
    model_name: str = "the model",
) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
    """(texts done, attention mask, feeds) per batch of ``batch_size`` texts, in order."""
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        tokens = tokenizer(chunk, max_length)
        yield start + len(chunk), tokens["attention_mask"], text_feeds(inputs, tokens, model_name)
