"""Session fixtures for the engine tests: a tiny random BERT exported by optimum.

The BERT is a real transformer export (Attention, LayerNorm, Gelu subgraphs as optimum writes
them) so ONNX Runtime's transformer fusions are exercised for real, in a few seconds, without
pretrained weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .engine_models import VOCAB


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.onnx`` of a 2-layer, hidden-32, 4-head random BERT, with config and vocab beside."""
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(root / "hf")
    out = root / "onnx"
    main_export(str(root / "hf"), output=str(out), task="feature-extraction", do_validation=False)
    (out / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(VOCAB)) + "\n")
    return out / "model.onnx"
