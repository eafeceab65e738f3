"""Shared fixtures: a tiny word-level tokenizer and a tiny BERT classifier saved in HF format.

Both are built in code (no download) so export, calibration and Fisher tests run in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hf_models import save_llama
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
    folder = save_llama(
        tmp_path_factory.mktemp("tiny-llama-hf"), vocab_size=len(SPECIALS) + len(WORDS)
    )
    return write_tokenizer(folder)


@pytest.fixture(scope="session")
def tiny_llama_past(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """``tiny_llama_dir`` exported with past (text-generation-with-past): the model.onnx path."""
    from factorlm.exporters.hf import export

    out = tmp_path_factory.mktemp("tiny-llama-past") / "onnx"
    export(tiny_llama_dir, out, task="text-generation-with-past", progress=False)
    return out / "model.onnx"


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """Ray's multi-node test cluster: a head and one more node, one CPU and 80 MiB of object store
    each (skipped without Ray); shut down, with any driver connected to it, after the module."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    store = 80 * 1024 * 1024
    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": store, "include_dashboard": False},
    )
    nodes.add_node(num_cpus=1, object_store_memory=store)
    nodes.wait_for_nodes()
    yield nodes
    if ray.is_initialized():
        ray.shutdown()
    nodes.shutdown()
