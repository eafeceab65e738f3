"""Calibration statistics from real data: activation Gram/mean |x| (ORT) and Fisher (PyTorch).

Why a package: the data-aware decompositions (whitened/DRONE, ASVD, FWSVD) need per-weight
statistics of the *ONNX* graph being rewritten, keyed by initializer name; see
docs/CONTRACTS.md for the ``CalibrationStats`` contract.
"""

from __future__ import annotations

import logging

from factorlm.calibration.capture import collect_statistics
from factorlm.calibration.fisher import (
    collect_fisher,
    collect_output_fisher,
    collect_output_gram,
)
from factorlm.calibration.stats import CalibrationStats
from factorlm.calibration.targets import Target, find_targets

__all__ = [
    "CalibrationStats",
    "Target",
    "collect_fisher",
    "collect_output_fisher",
    "collect_output_gram",
    "collect_statistics",
    "find_targets",
]

logger = logging.getLogger(__name__)
