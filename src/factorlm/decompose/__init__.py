"""The decomposition core: pure numpy/scipy factorizations of ``y = x @ W`` weights.

``W`` is ``(in_features, out_features)``. Every function validates its inputs (raising
``ValueError`` subclasses that name the problem), computes in float64 and returns factors in the
weight's dtype, as frozen dataclasses that know their parameter and FLOP counts.
"""

from __future__ import annotations

import logging

from factorlm.decompose._validate import DecompositionError
from factorlm.decompose.data_aware import activation_scaled_svd, whitened_svd
from factorlm.decompose.fisher import fisher_weighted_svd
from factorlm.decompose.kronecker import KroneckerFactors, kronecker, propose_kronecker_shapes
from factorlm.decompose.methods import METHODS, Method, decompose, spectrum
from factorlm.decompose.rank import (
    WeightSpectrum,
    allocate_ranks,
    break_even_rank,
    rank_for_energy,
    round_rank,
)
from factorlm.decompose.sparse import LowRankSparse, lowrank_plus_sparse
from factorlm.decompose.svd import DEFAULT_SEED, LowRank, truncated_svd

__all__ = [
    "DEFAULT_SEED",
    "METHODS",
    "DecompositionError",
    "KroneckerFactors",
    "LowRank",
    "LowRankSparse",
    "Method",
    "WeightSpectrum",
    "activation_scaled_svd",
    "allocate_ranks",
    "break_even_rank",
    "decompose",
    "fisher_weighted_svd",
    "kronecker",
    "lowrank_plus_sparse",
    "propose_kronecker_shapes",
    "rank_for_energy",
    "round_rank",
    "spectrum",
    "truncated_svd",
    "whitened_svd",
]

logger = logging.getLogger(__name__)
