"""The compression plan as data: which weight gets which factorization, and what it costs.

``make_plan`` (``planner``) is a pure function of the analysed weights, optional calibration
statistics and a budget; it hands linear weights to ``lowrank`` or ``kronecker``. Its result
(``schema``: ``Plan``, ``WeightPlan``) is JSON keyed by initializer name that a user can read,
edit and pass back with ``--plan``; ``validate_plan`` (``validation``) checks an edited plan
against the model and recomputes its costs (``costs``). Planning reads the model only through
the ``AnalysisLike`` protocol, so it imports no graph code: ``factorlm.passes`` builds on it.
"""

from __future__ import annotations

import logging

from factorlm.planning.costs import dense_cost, fill_costs
from factorlm.planning.kronecker import KRON_SHAPES, supports_kronecker
from factorlm.planning.latency import (
    LatencyAllocation,
    LatencyCurve,
    LatencyModel,
    allocate_latency,
    measured_ranks,
    shape_key,
)
from factorlm.planning.lowrank import factor_statistics, lookup_weight, supports_lowrank_sparse
from factorlm.planning.planner import make_plan
from factorlm.planning.schema import (
    ALL_METHODS,
    DATA_AWARE,
    PLAN_FORMAT,
    SPARSE_STRUCTURES,
    AnalysisLike,
    CandidateLike,
    Plan,
    StatsLike,
    WeightPlan,
    load_plan,
)
from factorlm.planning.validation import validate_plan

__all__ = [
    "ALL_METHODS",
    "DATA_AWARE",
    "KRON_SHAPES",
    "PLAN_FORMAT",
    "SPARSE_STRUCTURES",
    "AnalysisLike",
    "CandidateLike",
    "LatencyAllocation",
    "LatencyCurve",
    "LatencyModel",
    "Plan",
    "StatsLike",
    "WeightPlan",
    "allocate_latency",
    "dense_cost",
    "factor_statistics",
    "fill_costs",
    "load_plan",
    "lookup_weight",
    "make_plan",
    "measured_ranks",
    "shape_key",
    "supports_kronecker",
    "supports_lowrank_sparse",
    "validate_plan",
]

logger = logging.getLogger(__name__)
