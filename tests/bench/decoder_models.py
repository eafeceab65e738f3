"""A tiny random-weight Llama with a word-level tokenizer, exported to ONNX with a KV cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_vocab import SPECIALS, WORDS

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "bos_token": "[CLS]",
        "eos_token": "[SEP]",
        "model_max_length": 128,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    """Save a random 2-layer Llama (hidden 64, vocab 256, GQA 4/2 heads, tied head) + tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        initializer_range=0.3,  # wide logits: varied continuations, no near-ties in argmax
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return write_decoder_tokenizer(folder)
