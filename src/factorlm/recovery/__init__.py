"""Recovery by training: apply a plan to the PyTorch model, distil it, export it factorized.

``recover(model_dir, plan, out_dir, RecoverOptions(...), data=...)`` is the stage; ``apply_plan`` and the
modules in ``factorlm.recovery.modules`` are its parts (see their docstrings for the math).
"""

from __future__ import annotations

import logging

from factorlm.recovery.api import RecoveryResult, checkpoint_dir_for, recover
from factorlm.recovery.apply import AppliedPlan, apply_plan, factorize_entry, load_plan
from factorlm.recovery.train import METHODS, TrainConfig, TrainResult, train

__all__ = [
    "METHODS",
    "AppliedPlan",
    "RecoveryResult",
    "TrainConfig",
    "TrainResult",
    "apply_plan",
    "checkpoint_dir_for",
    "factorize_entry",
    "load_plan",
    "recover",
    "train",
]

logger = logging.getLogger(__name__)
