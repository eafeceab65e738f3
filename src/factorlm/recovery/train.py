"""Distillation of a factorized student against the original model, on CPU, resumable.

Losses (teacher = the original model, frozen; student = the factorized model):

- feature distillation (Ben Noach & Goldberg 2020, first phase): the mean over layers of the
  relative squared error of hidden states on real tokens, ``Σ‖h_s − h_t‖² / Σ‖h_t‖²``;
- output distillation (second phase): an encoder's last hidden state (relative squared error)
  plus ``1 − cos`` of mean-pooled embeddings; a classifier's or causal LM's logits by
  temperature-scaled KL; a causal LM may add ``lm_weight`` times the next-token cross-entropy
  on the text itself.

Methods add to that loop: ``losparse`` re-densifies each sparse residual to ``W − L R`` and prunes
it by smoothed importance ``|θ·∇θ|`` (EMA of importance times EMA of its deviation) on a cubic
schedule down to the plan's density; ``dsee`` freezes the factors and trains a rank-``k``
update plus a sparse update on a fixed support, then merges them and prunes the result back to
the plan's rank (truncated SVD, a structured pruning of rank components).

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
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from factorlm._common.outputs import mark_owned, read_marker
from factorlm.errors import ConfigError, ModelLoadError
from factorlm.recovery.modules import FactorizedLinear, LowRankSparseLinear

__all__ = ["METHODS", "DseeLinear", "TrainConfig", "TrainResult", "train"]

logger = logging.getLogger(__name__)

METHODS = ("distill", "losparse", "dsee", "kron-kd", "safe")
CLOCKS = ("wall", "cpu")
CHECKPOINT = "checkpoint.pt"
_BUCKET = 8  # batches per length-sorted group
#: Config fields a resumed run must share with its checkpoint.
_RESUME_KEYS = (
    "method", "steps", "batch_size", "max_length", "lr", "seed", "feature_fraction",
    "temperature", "lm_weight",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Training settings; ``steps`` is the schedule's horizon, ``time_budget_s`` a hard cap."""

    method: str = "distill"
    steps: int = 500
    time_budget_s: float | None = None
    batch_size: int = 16
    max_length: int = 128
    lr: float = 1e-4
    warmup: float = 0.05
    feature_fraction: float = 0.5
    temperature: float = 2.0
    seed: int = 0
    checkpoint_every: int = 50
    prune_start: float = 0.1
    prune_end: float = 0.7
    importance_beta: float = 0.85
    dsee_rank: int = 8
    dsee_density: float = 0.005
    threads: int | None = None  # torch intra-op threads; 1 is fastest on an oversubscribed CPU
    clock: str = "wall"  # what time_budget_s counts: "wall" or "cpu" (process CPU time)
    lm_weight: float = 0.0  # causal LM: weight of the next-token cross-entropy (output phase)


@dataclass
class TrainResult:
    """What a run did: steps, seconds of training, loss history and why it stopped.

    ``seconds`` is wall time in training steps, ``cpu_seconds`` the process CPU time in them.
    ``stopped`` is ``"steps"`` (the schedule ran to its horizon) or ``"time"`` (the budget ended
    it first, so the learning rate never decayed); ``warning`` then says so in words.
    """

    steps_done: int
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int | None = None
    stopped: str = "steps"
    cpu_seconds: float = 0.0
    warning: str | None = None


def _cut_short(cfg: TrainConfig, step: int) -> str:
    """The warning for a run the time budget stopped at ``step``, before the ``cfg.steps`` horizon."""
    feature_steps = math.ceil(cfg.feature_fraction * cfg.steps)
    phase = (
        f" and the output-distillation phase (after step {feature_steps}) never started"
        if step <= feature_steps < cfg.steps
        else ""
    )
    return (
        f"the time budget ({cfg.time_budget_s:g} {cfg.clock} s) stopped training after "
        f"{step}/{cfg.steps} steps, so the learning rate never decayed (it was still at "
        f"{_lr(cfg, step - 1) / cfg.lr:.0%} of its peak){phase}; "
        f"lower steps (--steps) to about {max(1, step * 9 // 10)} so the schedule fits the budget."
    )


class DseeLinear(nn.Module):
    """DSEE around a frozen ``FactorizedLinear``: ``base(x) + (x U) V + x (S ⊙ M)``."""

    mask: torch.Tensor

    def __init__(self, base: FactorizedLinear, original: torch.Tensor, rank: int, density: float):
        super().__init__()
        self.base = base
        for p in (base.first.weight, base.second.weight):
            p.requires_grad_(False)
        m, n = base.in_features, base.out_features
        generator = torch.Generator().manual_seed(m * 7919 + n)
        self.u = nn.Parameter(torch.randn(m, rank, generator=generator) / m**0.5)
        self.v = nn.Parameter(torch.zeros(rank, n))
        with torch.no_grad():
            residual = original - base.first.weight.T @ base.second.weight.T
            count = max(1, round(density * m * n))
            threshold = residual.abs().flatten().kthvalue(m * n - count + 1).values
            self.register_buffer("mask", (residual.abs() >= threshold).float())
        self.s = nn.Parameter(torch.zeros(m, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.u) @ self.v + x @ (self.s * self.mask)

    def merge(self) -> FactorizedLinear:
        """Fold the updates in, then keep the best rank-``r`` part (structured pruning)."""
        from factorlm.decompose import truncated_svd

        base = self.base
        with torch.no_grad():
            dense = (
                base.first.weight.T @ base.second.weight.T + self.u @ self.v + self.s * self.mask
            )
        low = truncated_svd(dense.double().numpy(), base.rank)
        bias = base.second.bias
        return FactorizedLinear.from_factors(
            low.left.astype(np.float32), low.right.astype(np.float32), bias
        )


def _lr(cfg: TrainConfig, step: int) -> float:
    warm = max(1, round(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


def _density(cfg: TrainConfig, step: int, final: float) -> float:
    """Cubic schedule: 1 until ``prune_start``, ``final`` from ``prune_end`` on."""
    start, end = cfg.prune_start * cfg.steps, cfg.prune_end * cfg.steps
    if step < start:
        return 1.0
    if step >= end:
        return final
    progress = (step - start) / max(1.0, end - start)
    return final + (1.0 - final) * (1.0 - progress) ** 3


def _stream(cfg: TrainConfig, start: int, count: int, n: int) -> list[int]:
    """``count`` indices from position ``start`` of the seeded per-epoch permutation stream."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        take = min(count - len(out), n - offset)
        out.extend(int(i) for i in perm[offset : offset + take])
        pos += take
    return out


def _batch_indices(cfg: TrainConfig, step: int, lengths: Sequence[int]) -> list[int]:
    """The texts of ``step``: groups of ``_BUCKET`` batches are sorted by length, so padding
    stays small; the choice depends on (seed, step) only, never on earlier steps."""
    group, slot = divmod(step, _BUCKET)
    size = cfg.batch_size * _BUCKET
    chosen = _stream(cfg, group * size, size, len(lengths))
    chosen.sort(key=lambda i: lengths[i])
    return chosen[slot * cfg.batch_size : (slot + 1) * cfg.batch_size]


def _kind(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "lm"
    if name.endswith("ForSequenceClassification"):
        return "classification"
    return "encoder"


def _relative_sq(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(a.dtype)
    return (((a - b) ** 2) * m).sum() / ((b**2) * m).sum().clamp_min(1e-12)


def _pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def _kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    log_s = torch.log_softmax(student / t, dim=-1)
    log_t = torch.log_softmax(teacher / t, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1) * t * t


def _loss(
    kind: str,
    cfg: TrainConfig,
    feature: bool,
    s_out: Any,
    t_out: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    if feature:
        pairs = zip(s_out.hidden_states, t_out.hidden_states, strict=True)
        return torch.stack([_relative_sq(s, t, mask) for s, t in pairs]).mean()
    if kind == "encoder":
        s_h, t_h = s_out.last_hidden_state, t_out.last_hidden_state
        cos = torch.cosine_similarity(_pool(s_h, mask), _pool(t_h, mask), dim=-1)
        return _relative_sq(s_h, t_h, mask) + (1.0 - cos).mean()
    kl = _kl(s_out.logits, t_out.logits, cfg.temperature)
    if kind == "classification":
        return kl.mean()
    loss = (kl * mask).sum() / mask.sum().clamp_min(1)
    if cfg.lm_weight > 0:
        loss = loss + cfg.lm_weight * _next_token_loss(s_out.logits, ids, mask)
    return loss


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting each real token from the ones before it."""
    scored = (mask[:, 1:] * mask[:, :-1]).reshape(-1).to(logits.dtype)
    nll = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    return (nll * scored).sum() / scored.sum().clamp_min(1)


def _weight(model: nn.Module, path: str) -> torch.Tensor:
    """The dense ``(in, out)`` weight of the ``nn.Linear`` at ``path``."""
    linear = model.get_submodule(path)
    assert isinstance(linear, nn.Linear)
    return linear.weight.detach().T


def _setup_method(cfg: TrainConfig, student: nn.Module, teacher: nn.Module) -> dict[str, Any]:
    """Method-specific structure changes, made identically on fresh and resumed runs."""
    state: dict[str, Any] = {}
    if cfg.method == "losparse":
        found = False
        for path, module in student.named_modules():
            if not isinstance(module, LowRankSparseLinear):
                continue
            found = True
            module.expand()
            original = _weight(teacher, path)
            with torch.no_grad():
                low = module.first.weight.T @ module.second.weight.T
                module.sparse.copy_(original - low)
                module.mask.fill_(1.0)
            state[path] = {
                "imp": torch.zeros_like(module.sparse),
                "unc": torch.zeros_like(module.sparse),
            }
        if not found:
            raise ConfigError(
                "method 'losparse' needs a plan made with --method losparse (low-rank + sparse weights)."
            )
    elif cfg.method == "dsee":
        wrapped = 0
        for path, module in list(student.named_modules()):
            if type(module) is FactorizedLinear:
                original = _weight(teacher, path)
                parent_path, _, child = path.rpartition(".")
                parent = student.get_submodule(parent_path) if parent_path else student
                setattr(
                    parent, child, DseeLinear(module, original, cfg.dsee_rank, cfg.dsee_density)
                )
                wrapped += 1
        if not wrapped:
            raise ConfigError("method 'dsee' needs a plan with low-rank linear weights.")
    return state


def _prune_step(cfg: TrainConfig, student: nn.Module, state: dict[str, Any], step: int) -> None:
    """LoSparse: update smoothed importance, then mask the least important sparse entries."""
    beta = cfg.importance_beta
    for path, st in state.items():
        module = student.get_submodule(path)
        assert isinstance(module, LowRankSparseLinear)
        grad = module.sparse.grad
        if grad is None:
            continue
        with torch.no_grad():
            score = (module.sparse * grad).abs()
            st["imp"].mul_(beta).add_(score, alpha=1 - beta)
            st["unc"].mul_(beta).add_((score - st["imp"]).abs(), alpha=1 - beta)
            density = _density(cfg, step + 1, module.density)
            importance = (st["imp"] * st["unc"]) * module.mask
            m, n = importance.shape
            if module.structure == "column":
                rows = importance.sum(dim=1)
                keep = round(density * m)
                new = torch.zeros(m, dtype=torch.bool)
                if keep > 0:
                    new[torch.topk(rows, keep).indices] = True
                mask = new.unsqueeze(1).expand(m, n).float()
            elif module.structure == "2:4" and density <= module.density:
                continue  # 2:4 keeps the plan's pattern; only its values train
            else:
                keep = round(density * m * n)
                flat = torch.zeros(m * n)
                if keep > 0:
                    flat[torch.topk(importance.flatten(), keep).indices] = 1.0
                mask = flat.view(m, n)
            module.mask.mul_(mask)
            module.sparse.mul_(module.mask)


def _finish_method(cfg: TrainConfig, student: nn.Module) -> None:
    if cfg.method == "dsee":
        for path, module in list(student.named_modules()):
            if isinstance(module, DseeLinear):
                parent_path, _, child = path.rpartition(".")
                parent = student.get_submodule(parent_path) if parent_path else student
                setattr(parent, child, module.merge())
    if cfg.method == "losparse":
        for module in student.modules():
            if isinstance(module, LowRankSparseLinear):
                with torch.no_grad():
                    module.sparse.mul_(module.mask)
                module.compact()


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


def _save(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    """The three RNG states as tensors and plain numbers only, so ``weights_only`` loads them."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(list(internal), dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
    }


def _set_rng_state(rng: dict[str, Any], path: Path) -> None:
    """Restore what ``_rng_state`` stored; a malformed entry is one sentence, not a traceback."""
    try:
        torch.set_rng_state(rng["torch"])
        n = rng["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (str(n["name"]), keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
        )
        p = rng["python"]
        state = tuple(int(v) for v in p["state"].tolist())
        random.setstate((int(p["version"]), state, p["gauss_next"]))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise ModelLoadError(
            f"checkpoint {path} holds a malformed RNG state ({exc}); delete it or run without "
            "--resume."
        ) from None


#: Keys every checkpoint holds, with the types ``train`` relies on.
_PAYLOAD_TYPES: dict[str, type | tuple[type, ...]] = {
    "config": dict, "student": dict, "optimizer": dict, "method_state": dict, "step": int,
    "seconds": (int, float), "losses": list, "rng": dict,
}  # fmt: skip


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, so a
    planted file cannot run code; anything else is refused in one sentence."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol ..." is noise here
            payload = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ModelLoadError(
            f"checkpoint {path} holds objects other than tensors and plain values (a pickle "
            "that could run code), so it was not loaded; delete it or run without --resume."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError) as exc:
        raise ModelLoadError(
            f"checkpoint {path} is truncated or not a factorlm checkpoint "
            f"({type(exc).__name__}); delete it or run without --resume."
        ) from None
    if not isinstance(payload, dict):
        raise ModelLoadError(f"checkpoint {path} is not a factorlm checkpoint; delete it.")
    for key, kind in _PAYLOAD_TYPES.items():
        if not isinstance(payload.get(key), kind):
            raise ModelLoadError(
                f"checkpoint {path} lacks a valid {key!r} entry; delete it or run without --resume."
            )
    return payload


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
    if cfg.method not in METHODS:
        raise ConfigError(f"method {cfg.method!r} is unknown; use one of {', '.join(METHODS)}.")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.checkpoint_every < 1:
        raise ConfigError("steps, batch size and checkpoint interval must be positive integers.")
    if cfg.clock not in CLOCKS:
        raise ConfigError(f"clock {cfg.clock!r} is unknown; use one of {', '.join(CLOCKS)}.")
    if not cfg.lm_weight >= 0:
        raise ConfigError(f"lm_weight {cfg.lm_weight!r} must not be negative.")
    if not cfg.temperature > 0:
        raise ConfigError(f"temperature {cfg.temperature!r} must be positive.")
    if not 0 <= cfg.feature_fraction <= 1:
        raise ConfigError(f"feature_fraction {cfg.feature_fraction!r} must lie in [0, 1].")
    if not cfg.lr > 0:
        raise ConfigError(f"learning rate {cfg.lr!r} must be positive.")
    kind = _kind(student)
    rows = _encode(tokenizer, texts, kind, cfg.max_length)
    if not rows:
        raise ConfigError("the distillation data holds no tokens.")
    lengths = [len(r) for r in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    teacher.eval()
    student.eval()  # dropout off: reproducible, and better for short distillation
    for p in teacher.parameters():
        p.requires_grad_(False)
    state = _setup_method(cfg, student, teacher)
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
        payload = _load_checkpoint(ckpt_path)
        saved = payload["config"]
        for key in _RESUME_KEYS:
            if saved.get(key) != getattr(cfg, key):
                raise ConfigError(
                    f"checkpoint {ckpt_path} was made with {key}={saved.get(key)!r}, not "
                    f"{getattr(cfg, key)!r}; rerun with the same settings or without --resume."
                )
        student.load_state_dict(payload["student"])
        optimizer.load_state_dict(payload["optimizer"])
        state = payload["method_state"]
        step, seconds, losses = payload["step"], payload["seconds"], payload["losses"]
        cpu_seconds = payload.get("cpu_seconds", 0.0)
        _set_rng_state(payload["rng"], ckpt_path)
        resumed_from = step
        logger.info("Resumed from %s at step %d", ckpt_path, step)

    def checkpoint() -> None:
        _save(
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
                "rng": _rng_state(),
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
            batch = _collate([rows[i] for i in _batch_indices(cfg, step, lengths)], pad_id)
            feature = step < cfg.feature_fraction * cfg.steps
            for group in optimizer.param_groups:
                group["lr"] = _lr(cfg, step)
            extra = {"logits_to_keep": 1} if feature and lean else {}
            with torch.no_grad():
                t_out = teacher(**batch, output_hidden_states=feature, **extra)
            s_out = student(**batch, output_hidden_states=feature, **extra)
            loss = _loss(
                kind, cfg, feature, s_out, t_out, batch["input_ids"], batch["attention_mask"]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if state and cfg.method == "losparse":
                _prune_step(cfg, student, state, step)
            optimizer.step()
            if cfg.method == "losparse":
                with torch.no_grad():
                    for module in student.modules():
                        if isinstance(module, LowRankSparseLinear):
                            module.sparse.mul_(module.mask)
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
        warning = _cut_short(cfg, step)
        logger.warning("Stopped early: %s", warning)
    _finish_method(cfg, student)
    return TrainResult(step, seconds, losses, resumed_from, stopped, cpu_seconds, warning)
