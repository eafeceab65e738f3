"""Recovery of a causal LM with tied embeddings, and a time budget counted in CPU seconds."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from factorlm.compression import compress
from factorlm.errors import ConfigError
from factorlm.exporters.hf import load_torch_model
from factorlm.passes.analysis import FACTOR_METADATA_KEY
from factorlm.recovery import TrainConfig, apply_plan, recover, train
from factorlm.recovery.losses import next_token_loss
from factorlm.recovery.modules import FactorizedLinear
from tiny_vocab import TEXTS

TASK = "text-generation-with-past"


def _plan(tmp: Path, onnx_model: Path) -> Path:
    result = compress(
        onnx_model, tmp / "c" / "model.onnx", method="svd", ratio=0.6, rank_multiple=4,
        min_size=0,
        joint_qkv=False,
    )  # fmt: skip
    assert result.factorized > 0
    return result.plan_path


def test_tied_lm_recovers_and_exports(
    tmp_path: Path, tiny_llama_dir: Path, tiny_llama_past: Path
) -> None:
    plan = _plan(tmp_path, tiny_llama_past)
    model = load_torch_model(tiny_llama_dir, TASK, False)
    applied = apply_plan(model, plan, tiny_llama_past)
    # A linear-only plan leaves the tied embedding / LM head pair alone.
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert not any(path.endswith(("embed_tokens", "lm_head")) for path in applied.modules.values())
    assert all(
        isinstance(model.get_submodule(p), FactorizedLinear) for p in applied.modules.values()
    )
    out = recover(
        tiny_llama_dir, plan, tmp_path / "out", method="distill", data=TEXTS * 4, steps=6,
        batch_size=2, max_length=8, lr=1e-3, onnx_model=tiny_llama_past, progress=False,
        clock="cpu", time_budget_s=600, lm_weight=0.5, temperature=1.0,
    )  # fmt: skip
    assert out.steps_done == 6 and out.stopped == "steps" and out.task == TASK
    assert out.train_cpu_seconds > 0 and out.max_relative_diff < 1e-3
    assert out.tagged_factors > 0
    names = [i.name for i in onnx.load(str(out.model), load_external_data=False).graph.input]
    assert any(n.startswith("past_key_values") for n in names)
    props = {
        p.key: p.value for p in onnx.load(str(out.model), load_external_data=False).metadata_props
    }
    assert set(json.loads(props[FACTOR_METADATA_KEY]).values()) == set(applied.modules)
    record = json.loads((tmp_path / "out" / "recovery.json").read_text())
    assert record["train"]["clock"] == "cpu" and record["train"]["lm_weight"] == 0.5
    assert record["train_cpu_seconds"] == out.train_cpu_seconds


def test_lm_weight_adds_the_next_token_loss() -> None:
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    got = next_token_loss(logits, ids, mask)
    rows = [(0, t) for t in range(4)] + [(1, t) for t in range(2)]
    want = np.mean([-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]].item() for b, t in rows])
    assert abs(float(got) - want) < 1e-5


def _student(tiny_llama_dir: Path, tiny_llama_past: Path, plan: Path) -> tuple[Any, Any, Any]:
    from transformers import AutoTokenizer

    teacher = load_torch_model(tiny_llama_dir, TASK, False)
    student = load_torch_model(tiny_llama_dir, TASK, False)
    apply_plan(student, plan, tiny_llama_past)
    return student, teacher, AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_cpu_budget_counts_process_time_and_resumes(
    tmp_path: Path,
    tiny_llama_dir: Path,
    tiny_llama_past: Path,
    fake_cpu_clock: Callable[[float], None],
) -> None:
    plan = _plan(tmp_path, tiny_llama_past)
    texts = TEXTS * 4
    base: dict[str, Any] = dict(steps=12, batch_size=2, max_length=8, lr=1e-3, checkpoint_every=100)
    # Each step costs 10 fake CPU seconds.
    fake_cpu_clock(10.0)
    cpu = TrainConfig(**base, time_budget_s=35.0, clock="cpu")
    student, teacher, tok = _student(tiny_llama_dir, tiny_llama_past, plan)
    run = train(student, teacher, tok, texts, cpu, tmp_path / "ck", progress=False)
    # Stops before a step that would cross the budget: 3 steps (30 s), not a 4th (40 s).
    assert (run.stopped, run.steps_done, run.cpu_seconds) == ("time", 3, 30.0)
    assert run.seconds < 35.0  # the wall clock saw far less than the budget
    # Resume with a larger budget: the CPU seconds spent so far count.
    more = TrainConfig(**base, time_budget_s=55.0, clock="cpu")
    student2, teacher2, _ = _student(tiny_llama_dir, tiny_llama_past, plan)
    again = train(
        student2, teacher2, tok, texts, more, tmp_path / "ck", resume=True, progress=False
    )  # fmt: skip
    assert again.resumed_from == 3
    assert (again.stopped, again.steps_done, again.cpu_seconds) == ("time", 5, 50.0)
    # A wall-clock budget ignores the CPU clock: 12 steps are 120 fake CPU seconds.
    wall = TrainConfig(**base, time_budget_s=100.0, clock="wall")
    student3, teacher3, _ = _student(tiny_llama_dir, tiny_llama_past, plan)
    straight = train(student3, teacher3, tok, texts, wall, tmp_path / "ck3", progress=False)
    assert straight.stopped == "steps" and straight.steps_done == 12, straight
    with pytest.raises(ConfigError, match="clock 'gpu' is unknown"):
        bad = TrainConfig(**base, clock="gpu")
        train(student3, teacher3, tok, texts, bad, tmp_path / "ck4", progress=False)


def _ort_logits(onnx_model: Path, ids: np.ndarray) -> np.ndarray:
    """Logits of a with-past export for ``ids`` (batch, seq) with an empty cache."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {}
    for meta in session.get_inputs():
        if meta.name == "input_ids":
            feeds[meta.name] = ids
        elif meta.name == "attention_mask":
            feeds[meta.name] = np.ones_like(ids)
        elif meta.name == "position_ids":
            feeds[meta.name] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        else:  # past_key_values.*: (batch, kv heads, 0, head dim)
            _, heads, _, dim = meta.shape
            feeds[meta.name] = np.zeros((ids.shape[0], heads, 0, dim), dtype=np.float32)
    return np.asarray(session.run(["logits"], feeds)[0])


def test_tied_embedding_and_head_share_factors_and_recover(
    tmp_path: Path, tiny_llama_dir: Path, tiny_llama_past: Path
) -> None:
    from factorlm.recovery.modules import FactorizedEmbedding, TiedFactorizedHead

    result = compress(
        tiny_llama_past, tmp_path / "c" / "model.onnx", method="svd", ratio=0.6, embeddings=0.5,
        rank_multiple=4, min_size=0,
    )  # fmt: skip
    plan = json.loads(result.plan_path.read_text())
    tied = [n for n, e in plan["weights"].items() if e.get("kind") == "embedding"]
    assert len(tied) == 1, plan["weights"].keys()
    model = load_torch_model(tiny_llama_dir, TASK, False)
    applied = apply_plan(model, result.plan_path, tiny_llama_past)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, FactorizedEmbedding) and isinstance(head, TiedFactorizedHead)
    assert head.embedding is embed and applied.modules[tied[0]] == "model.embed_tokens"
    # Each factor is one parameter: the head registers none of its own.
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("lm_head") for n in names)
    assert sum(n.startswith("model.embed_tokens") for n in names) == 2
    vocab, width = embed.num_embeddings, embed.embedding_dim
    assert embed.rank * (vocab + width) <= 0.5 * vocab * width + 4 * (vocab + width)
    # Before training the student is the compressed graph: same logits, tight tolerance.
    ids = np.asarray([[1, 5, 9, 12, 7, 3, 20, 4], [2, 8, 8, 15, 6, 11, 3, 9]], dtype=np.int64)
    with torch.no_grad():
        student = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    graph = _ort_logits(tmp_path / "c" / "model.onnx", ids)
    dense = _ort_logits(tiny_llama_past, ids)
    scale = float(np.abs(graph).max())
    assert float(np.abs(student - graph).max()) < 1e-4 * scale
    assert float(np.abs(dense - graph).max()) > 1e-2 * scale  # the head really is truncated
    # Distil, export: the export runs in ORT, stores each factor once and tags both.
    out = recover(
        tiny_llama_dir, result.plan_path, tmp_path / "out", method="distill", data=TEXTS * 4,
        steps=4, batch_size=2, max_length=8, lr=1e-3, onnx_model=tiny_llama_past,
        progress=False, lm_weight=0.5, temperature=1.0,
    )  # fmt: skip
    assert out.steps_done == 4 and out.max_relative_diff < 1e-3
    recovered = _ort_logits(out.model, ids)
    assert recovered.shape == graph.shape and np.isfinite(recovered).all()
    assert float(np.abs(recovered - graph).max()) > 0  # training moved it
    proto = onnx.load(str(out.model))
    big = [i for i in proto.graph.initializer if vocab in tuple(i.dims)]
    assert [tuple(i.dims) for i in big] == [(vocab, embed.rank)]  # no dense or copied head
    tags = json.loads({p.key: p.value for p in proto.metadata_props}[FACTOR_METADATA_KEY])
    assert sum(v == tied[0] for v in tags.values()) == 2
    record = json.loads((tmp_path / "out" / "recovery.json").read_text())
    # Both factors are read in both layouts (lookup: L, Rᵀ; head: R, Lᵀ): one copy each went.
    assert record["shared_transposed_factors"] == 2


def test_safe_refuses_a_tied_embedding(
    tmp_path: Path, tiny_llama_dir: Path, tiny_llama_past: Path
) -> None:
    from factorlm.errors import PlanError

    result = compress(
        tiny_llama_past, tmp_path / "c" / "model.onnx", method="svd", ratio=0.6, embeddings=0.5,
        rank_multiple=4, min_size=0,
    )  # fmt: skip
    model = load_torch_model(tiny_llama_dir, TASK, False)
    with pytest.raises(PlanError, match="method 'safe' cannot factorize a tied embedding"):
        apply_plan(model, result.plan_path, tiny_llama_past, safe=True)
