"""Shared fixtures: a tiny word-level tokenizer and a tiny BERT classifier saved in HF format.

Both are built in code (no download) so export, calibration and Fisher tests run in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_vocab import SPECIALS, WORDS, write_tokenizer

__all__ = ["SPECIALS", "WORDS", "write_tokenizer"]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the tiny tokenizer."""
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 1-layer BERT sequence classifier (labels neg/pos) with tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=2,
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
    )
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    return write_tokenizer(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64, 4 heads, 2 KV heads) with its LM head tied to the
    input embedding (as in SmolLM2), saved in HF format with the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-hf")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return write_tokenizer(folder)


@pytest.fixture(scope="session")
def tiny_llama_past(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """``tiny_llama_dir`` exported with past (text-generation-with-past): the model.onnx path."""
    from factorlm.exporters.hf import export

    out = tmp_path_factory.mktemp("tiny-llama-past") / "onnx"
    export(tiny_llama_dir, out, task="text-generation-with-past", progress=False)
    return out / "model.onnx"
