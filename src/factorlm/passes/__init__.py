"""Graph surgery on onnx_ir models: analysis, then one rewrite pass per factorization form.

The passes do no math: they receive factors computed by ``factorlm.decompose`` (keyed by
initializer name, as in a plan) and only rewire the graph. Which weights a rewrite supports is
decided once in ``factorlm.planning`` (``supports_kronecker``, ``supports_lowrank_sparse``), which
reads the analysis through protocols: dependencies run decompose <- planning <- passes.
"""

from __future__ import annotations

import logging

from factorlm.passes.analysis import (
    FACTOR_METADATA_KEY,
    Analysis,
    Candidate,
    Skipped,
    Use,
    analyze,
    factor_names,
)
from factorlm.passes.cleanup import RemoveReplacedWeightsPass
from factorlm.passes.embedding import LowRankEmbeddingPass
from factorlm.passes.joint import JOINT_SEPARATOR, JointLinearPass, joint_statistics, member_names
from factorlm.passes.kronecker import KroneckerPass
from factorlm.passes.linear import LowRankLinearPass
from factorlm.passes.lowrank_sparse import LowRankSparsePass
from factorlm.passes.shared import MergeSharedMatMulsPass

__all__ = [
    "FACTOR_METADATA_KEY",
    "JOINT_SEPARATOR",
    "Analysis",
    "Candidate",
    "JointLinearPass",
    "KroneckerPass",
    "LowRankEmbeddingPass",
    "LowRankLinearPass",
    "LowRankSparsePass",
    "MergeSharedMatMulsPass",
    "RemoveReplacedWeightsPass",
    "Skipped",
    "Use",
    "analyze",
    "factor_names",
    "joint_statistics",
    "member_names",
]

logger = logging.getLogger(__name__)
