"""The decomposition core: pure numpy/scipy factorizations of ``y = x @ W`` weights.

``W`` is ``(in_features, out_features)``. Every function validates its inputs (raising
``ValueError`` subclasses that name the problem), computes in float64 and returns factors in the
weight's dtype, as frozen dataclasses that know their parameter and FLOP counts.
"""

from __future__ import annotations

import logging

from factorlm.decompose._validate import DecompositionError
from factorlm.decompose.corrected import (
    best_blend,
    best_shrinkage,
    blend_gram,
    corrected_weight,
    held_back_loglik,
    residual_error,
    shrink_gram,
)
from factorlm.decompose.data_aware import activation_scaled_svd, whitened_svd
from factorlm.decompose.fisher import fisher_weighted_svd
from factorlm.decompose.kronecker import (
    KroneckerFactors,
    kronecker,
    kronecker_cost,
    kronecker_spectrum,
    propose_kronecker_shapes,
)
from factorlm.decompose.methods import (
    METHODS,
    Method,
    PreparedWeight,
    decompose,
    prepare,
    prepared_lowrank,
    spectrum,
)
from factorlm.decompose.rank import (
    WeightOptions,
    WeightSpectrum,
    allocate_options,
    allocate_ranks,
    allocation_error,
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
    "PreparedWeight",
    "WeightOptions",
    "WeightSpectrum",
    "activation_scaled_svd",
    "allocate_options",
    "allocate_ranks",
    "allocation_error",
    "best_blend",
    "best_shrinkage",
    "blend_gram",
    "break_even_rank",
    "corrected_weight",
    "decompose",
    "fisher_weighted_svd",
    "held_back_loglik",
    "kronecker",
    "kronecker_cost",
    "kronecker_spectrum",
    "lowrank_plus_sparse",
    "prepare",
    "prepared_lowrank",
    "propose_kronecker_shapes",
    "rank_for_energy",
    "residual_error",
    "round_rank",
    "shrink_gram",
    "spectrum",
    "truncated_svd",
    "whitened_svd",
]

logger = logging.getLogger(__name__)
