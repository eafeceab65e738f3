"""A tiny random-weight Llama with a word-level tokenizer, exported to ONNX with a KV cache."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_models import save_llama
from tiny_vocab import SPECIALS, WORDS, write_tokenizer

__all__ = ["PROMPTS", "VOCAB", "tiny_llama", "write_decoder_tokenizer"]

#: Specials, the shared words, then filler tokens up to 256 entries.
VOCAB = SPECIALS + WORDS + [f"w{i}" for i in range(256 - len(SPECIALS) - len(WORDS))]
PROMPTS = [
    "the film is a good movie",
    "a bad plot w3 w17 and w40",
    "the story is funny and clever w100 w7",
    "long boring sad movie",
    "w5 w6 w7 w8 w9 w10 w11 w12 the best actor",
]


def write_decoder_tokenizer(folder: Path) -> Path:
    """Word-level tokenizer over VOCAB without special-token templates (a decoder's prompt)."""
    return write_tokenizer(folder, VOCAB, decoder=True)


def tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    """Save a random 2-layer Llama (hidden 64, vocab 256, GQA 4/2 heads, tied head) + tokenizer."""
    # wide initial weights: varied continuations, no near-ties in argmax
    save_llama(folder, vocab_size=len(VOCAB), max_positions=256, seed=seed, initializer_range=0.3)
    return write_decoder_tokenizer(folder)
