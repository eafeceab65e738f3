"""Session fixtures for the engine tests: a tiny random BERT exported by optimum.

The BERT is a real transformer export (Attention, LayerNorm, Gelu subgraphs as optimum writes
them) so ONNX Runtime's transformer fusions are exercised for real, in a few seconds, without
pretrained weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_models import export_bert

from .engine_models import VOCAB


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.onnx`` of a 2-layer, hidden-32, 4-head random BERT, with config and vocab beside."""
    root = tmp_path_factory.mktemp("tiny_bert")
    model = export_bert(root, vocab_size=VOCAB, hidden_size=32, intermediate_size=64)
    (model.parent / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(VOCAB)) + "\n")
    return model
