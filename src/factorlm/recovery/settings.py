"""What a distillation run is asked to do (``TrainConfig``) and what it did (``TrainResult``).

Kept apart from the loop so the schedule, the losses, the method hooks and the checkpoints read
the same settings without importing one another.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from factorlm.errors import ConfigError

__all__ = ["CLOCKS", "METHODS", "TrainConfig", "TrainResult", "check_config"]

logger = logging.getLogger(__name__)

METHODS = ("distill", "losparse", "dsee", "kron-kd", "safe")
CLOCKS = ("wall", "cpu")


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


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings ``train`` cannot run, in one sentence, before any model work."""
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
