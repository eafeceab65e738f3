"""The step-indexed schedule: learning rate, pruning density and which texts each step reads.

Everything here is a function of ``(cfg, step)`` only, never of earlier steps, so a run resumed
from a checkpoint takes exactly the steps an uninterrupted run would. Data order is a function
of (seed, epoch); the time budget decides where a run stops, never what a step does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from factorlm.recovery.settings import TrainConfig

__all__ = ["batch_indices", "cut_short_warning", "density_at", "learning_rate"]

logger = logging.getLogger(__name__)

_BUCKET = 8  # batches per length-sorted group


def learning_rate(cfg: TrainConfig, step: int) -> float:
    warm = max(1, round(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


def density_at(cfg: TrainConfig, step: int, final: float) -> float:
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


def batch_indices(cfg: TrainConfig, step: int, lengths: Sequence[int]) -> list[int]:
    """The texts of ``step``: groups of ``_BUCKET`` batches are sorted by length, so padding
    stays small; the choice depends on (seed, step) only, never on earlier steps."""
    group, slot = divmod(step, _BUCKET)
    size = cfg.batch_size * _BUCKET
    chosen = _stream(cfg, group * size, size, len(lengths))
    chosen.sort(key=lambda i: lengths[i])
    return chosen[slot * cfg.batch_size : (slot + 1) * cfg.batch_size]


def cut_short_warning(cfg: TrainConfig, step: int) -> str:
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
        f"{learning_rate(cfg, step - 1) / cfg.lr:.0%} of its peak){phase}; "
        f"lower steps (--steps) to about {max(1, step * 9 // 10)} so the schedule fits the budget."
    )
