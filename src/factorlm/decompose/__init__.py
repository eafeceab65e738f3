"""The decomposition core: pure numpy/scipy factorizations of ``y = x @ W`` weights.

``W`` is ``(in_features, out_features)``. Every function validates its inputs (raising
``ValueError`` subclasses that name the problem), computes in float64 and returns factors in the
weight's dtype, as frozen dataclasses that know their parameter and FLOP counts.
"""

from __future__ import annotations

import logging

from factorlm.decompose._validate import DecompositionError
from factorlm.decompose.svd import DEFAULT_SEED, LowRank, truncated_svd

__all__ = [
    "DEFAULT_SEED",
    "DecompositionError",
    "LowRank",
    "truncated_svd",
]

logger = logging.getLogger(__name__)
