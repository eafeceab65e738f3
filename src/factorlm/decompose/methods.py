"""One entry point per method name, for the planner: factors and cheap spectra.

``spectrum(W, method)`` returns the singular values of exactly the matrix that ``decompose(W,
method, r)`` truncates, so ``Σ s[r:]²`` is that method's (data-aware) squared error at rank r:
``‖W − M‖²`` for svd, ``‖X (W − M)‖² (+ δ‖W − M‖²)`` for whiten/drone, ``‖diag(s^α)(W − M)‖²``
for asvd and ``Σ_j I_j ‖W[:, j] − M[:, j]‖²`` for fwsvd. Only singular values are computed
(LAPACK without vectors), because the planner asks for every weight of the model.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import scipy.linalg

from factorlm.decompose._transform import Transform, lowrank_from_transform
from factorlm.decompose._validate import (
    DecompositionError,
    check_rank,
    check_vector,
    check_weight,
)
from factorlm.decompose.data_aware import asvd_transform, check_gram, whiten_transform
from factorlm.decompose.fisher import fisher_transform
from factorlm.decompose.svd import LowRank, SvdMethod

__all__ = ["METHODS", "Method", "decompose", "spectrum"]

logger = logging.getLogger(__name__)

Method = Literal["svd", "whiten", "drone", "asvd", "fwsvd"]
METHODS: tuple[str, ...] = ("svd", "whiten", "drone", "asvd", "fwsvd")


def _transform(
    weight: np.ndarray,
    method: str,
    gram: np.ndarray | None,
    mean_abs: np.ndarray | None,
    fisher: np.ndarray | None,
    alpha: float,
) -> Transform:
    w64 = weight.astype(np.float64)
    m, n = weight.shape
    if method == "svd":
        return Transform(w64)
    if method in ("whiten", "drone"):
        if gram is None:
            raise DecompositionError(f"method {method!r} needs gram (XᵀX of the weight's input).")
        return whiten_transform(w64, check_gram(gram, m))
    if method == "asvd":
        if mean_abs is None:
            raise DecompositionError("method 'asvd' needs mean_abs (mean |x| per input feature).")
        if not np.isfinite(alpha) or alpha < 0:
            raise DecompositionError(f"alpha must be a finite non-negative number, got {alpha!r}.")
        stats = check_vector(mean_abs, m, "mean_abs", what="mean |x| per input feature")
        return asvd_transform(w64, stats, float(alpha))
    if method == "fwsvd":
        if fisher is None:
            raise DecompositionError(
                "method 'fwsvd' needs fisher (Fisher row sums per output feature)."
            )
        stats = check_vector(fisher, n, "fisher", what="Fisher row sums per output feature")
        return fisher_transform(w64, stats)
    raise DecompositionError(f"method {method!r} is unknown; use one of {', '.join(METHODS)}.")


def decompose(
    W: np.ndarray,
    method: Method | str,
    rank: int,
    *,
    gram: np.ndarray | None = None,
    mean_abs: np.ndarray | None = None,
    fisher: np.ndarray | None = None,
    alpha: float = 0.5,
    rng: np.random.Generator | None = None,
    svd_method: SvdMethod = "auto",
) -> LowRank:
    """Rank-``rank`` factors of ``W`` by ``method`` (svd, whiten, drone, asvd, fwsvd)."""
    weight = check_weight(W)
    r = check_rank(rank, weight.shape)
    transform = _transform(weight, method, gram, mean_abs, fisher, alpha)
    return lowrank_from_transform(transform, r, weight.dtype, rng=rng, method=svd_method)


def spectrum(
    W: np.ndarray,
    method: Method | str,
    *,
    gram: np.ndarray | None = None,
    mean_abs: np.ndarray | None = None,
    fisher: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Descending singular values of the matrix ``method`` truncates (float64, min(m, n) long)."""
    weight = check_weight(W)
    transform = _transform(weight, method, gram, mean_abs, fisher, alpha)
    try:
        return scipy.linalg.svdvals(transform.matrix, check_finite=False)
    except np.linalg.LinAlgError:
        logger.debug("svdvals did not converge; retrying with gesvd")
        return scipy.linalg.svd(
            transform.matrix, compute_uv=False, check_finite=False, lapack_driver="gesvd"
        )
