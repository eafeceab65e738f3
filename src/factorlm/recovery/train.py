"""Distillation of a factorized student against the original model, on CPU, resumable.

The loop lives here; the pieces it runs are one module each: ``settings`` (``TrainConfig``,
``TrainResult``), ``losses`` (feature then output distillation), ``schedule`` (learning rate,
pruning density, which texts each step reads), ``methods`` (what losparse and dsee add) and
``checkpoint`` (saves, ``weights_only`` loads, RNG state).

Reproducibility: data order is a function of (seed, epoch), the learning rate a function of the
step, dropout is off, and a checkpoint holds the student, optimizer, step, method state and RNG
states, so a run interrupted after its last checkpoint and resumed reaches the same weights as
an uninterrupted one.

Time budget: ``time_budget_s`` caps the seconds spent in training steps, counted on ``clock``:
``"wall"`` (elapsed time) or ``"cpu"`` (``time.process_time()``: CPU time of this process, all
threads), which a loaded shared machine changes far less, so a budget in CPU seconds buys about
the same number of steps whatever else runs. The schedule is a function of ``steps`` only; the
budget decides where a run stops, never what a step does.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from factorlm._common.outputs import mark_owned, read_marker
from factorlm.errors import ConfigError
from factorlm.recovery.checkpoint import (
    CHECKPOINT,
    check_resumable,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from factorlm.recovery.losses import distillation_loss, model_kind
from factorlm.recovery.methods import (
    DseeLinear,
    finish_method,
    mask_sparse,
    prune_step,
    setup_method,
)
from factorlm.recovery.schedule import batch_indices, cut_short_warning, learning_rate
from factorlm.recovery.settings import CLOCKS, METHODS, TrainConfig, TrainResult, check_config

__all__ = ["CLOCKS", "METHODS", "DseeLinear", "TrainConfig", "TrainResult", "train"]

logger = logging.getLogger(__name__)


def _trainable(cfg: TrainConfig, student: nn.Module) -> list[nn.Parameter]:
    """Everything but a dense input embedding (large, and not what the plan changed)."""
    frozen = getattr(student, "get_input_embeddings")()  # noqa: B009 - a transformers model
    skip = {id(p) for p in frozen.parameters()} if isinstance(frozen, nn.Embedding) else set()
    params = []
    for p in student.parameters():
        if id(p) in skip:
            p.requires_grad_(False)
        elif p.requires_grad:
            params.append(p)
    return params


def _encode(tokenizer: Any, texts: Sequence[str], kind: str, max_length: int) -> list[list[int]]:
    if kind != "lm":
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        return [list(ids) for ids in enc["input_ids"] if len(ids) > 0]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
    blocks = [stream[i : i + max_length] for i in range(0, len(stream) - 1, max_length)]
    return [b for b in blocks if len(b) > 1]


def _collate(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def train(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    cfg: TrainConfig,
    checkpoint_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Distil ``student`` towards ``teacher`` on ``texts``; checkpoints go to ``checkpoint_dir``.

    ``resume`` continues from ``checkpoint_dir/checkpoint.pt`` (ConfigError when it is missing or
    was made with other settings). ``on_step(step, loss)`` runs after every step.
    """
    check_config(cfg)
    kind = model_kind(student)
    rows = _encode(tokenizer, texts, kind, cfg.max_length)
    if not rows:
        raise ConfigError("the distillation data holds no tokens.")
    lengths = [len(r) for r in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    teacher.eval()
    student.eval()  # dropout off: reproducible, and better for short distillation
    for p in teacher.parameters():
        p.requires_grad_(False)
    state = setup_method(cfg, student, teacher)
    params = _trainable(cfg, student)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if read_marker(checkpoint_dir) is None:
        mark_owned(checkpoint_dir, "recover")
    ckpt_path = checkpoint_dir / CHECKPOINT
    step, seconds, cpu_seconds, losses, resumed_from = 0, 0.0, 0.0, [], None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    if resume:
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint {ckpt_path} to resume from.")
        payload = load_checkpoint(ckpt_path)
        check_resumable(payload, cfg, ckpt_path)
        student.load_state_dict(payload["student"])
        optimizer.load_state_dict(payload["optimizer"])
        state = payload["method_state"]
        step, seconds, losses = payload["step"], payload["seconds"], payload["losses"]
        cpu_seconds = payload.get("cpu_seconds", 0.0)
        set_rng_state(payload["rng"], ckpt_path)
        resumed_from = step
        logger.info("Resumed from %s at step %d", ckpt_path, step)

    def checkpoint() -> None:
        save_checkpoint(
            ckpt_path,
            {
                "config": asdict(cfg),
                "student": student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "method_state": state,
                "step": step,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "losses": losses,
                "rng": rng_state(),
            },
        )

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    # A causal LM's feature loss needs no logits: skip the vocabulary projection when it can.
    lean = kind == "lm" and "logits_to_keep" in inspect.signature(student.forward).parameters
    stopped = "steps"
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        job = bar.add_task(f"recover ({cfg.method})", total=cfg.steps, completed=step)
        while step < cfg.steps:
            if cfg.time_budget_s is not None and step > (resumed_from or 0):
                spent = cpu_seconds if cfg.clock == "cpu" else seconds
                if spent + spent / max(1, step) > cfg.time_budget_s:
                    stopped = "time"
                    break
            start, cpu_start = time.perf_counter(), time.process_time()
            batch = _collate([rows[i] for i in batch_indices(cfg, step, lengths)], pad_id)
            feature = step < cfg.feature_fraction * cfg.steps
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            extra = {"logits_to_keep": 1} if feature and lean else {}
            with torch.no_grad():
                t_out = teacher(**batch, output_hidden_states=feature, **extra)
            s_out = student(**batch, output_hidden_states=feature, **extra)
            loss = distillation_loss(
                kind, cfg, feature, s_out, t_out, batch["input_ids"], batch["attention_mask"]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if state and cfg.method == "losparse":
                prune_step(cfg, student, state, step)
            optimizer.step()
            mask_sparse(cfg, student)
            step += 1
            seconds += time.perf_counter() - start
            cpu_seconds += time.process_time() - cpu_start
            value = float(loss.detach())
            losses.append((step, value))
            phase = "feature" if feature else "output"
            bar.update(
                job, completed=step, description=f"recover ({cfg.method}, {phase} loss {value:.4f})"
            )
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint()
            if on_step is not None:
                on_step(step, value)
    torch.set_num_threads(previous_threads)
    warning = None
    if stopped == "time":
        checkpoint()
        warning = cut_short_warning(cfg, step)
        logger.warning("Stopped early: %s", warning)
    finish_method(cfg, student)
    return TrainResult(step, seconds, losses, resumed_from, stopped, cpu_seconds, warning)
