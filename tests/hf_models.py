"""Tiny random Hugging Face models built in code (no download), shared by the test fixtures.

A plain module (not conftest.py) so fixtures in any folder can import it; the tokenizers beside
the models come from ``tiny_vocab``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["export_bert", "save_llama"]


def save_llama(
    folder: Path, *, vocab_size: int, max_positions: int = 128, seed: int = 0, **config: Any
) -> Path:
    """Save a random 2-layer Llama (hidden 64, GQA 4/2 heads) with its LM head tied to the input
    embedding (as in SmolLM2) in HF format into ``folder``; ``config`` overrides LlamaConfig keys."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**settings, **config})).eval().save_pretrained(folder)
    return folder


def export_bert(
    root: Path,
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    opset: int | None = None,
) -> Path:
    """A random 2-layer, 4-head ``BertModel`` saved in ``root/hf`` and exported by optimum
    (feature-extraction) into ``root/onnx``; returns its ``model.onnx``.

    A real transformer export (Attention, LayerNorm, Gelu subgraphs as optimum writes them), so
    ONNX Runtime's transformer fusions are exercised for real, in seconds.
    """
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=intermediate_size,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(root / "hf")
    out = root / "onnx"
    main_export(
        str(root / "hf"),
        output=str(out),
        task="feature-extraction",
        opset=opset,
        do_validation=False,
    )
    return out / "model.onnx"
