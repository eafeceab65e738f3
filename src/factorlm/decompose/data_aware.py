"""Data-aware SVDs that weight the input side by calibration statistics.

DRONE / SVD-LLM (whitening). With calibration activations ``X`` (tokens × in) and
``G = XᵀX = Sᵀ S``, ``‖X (W − M)‖_F = ‖S (W − M)‖_F``, so the optimum over rank-r ``M`` is
``M = S⁻¹ [S W]_r`` and its squared error is the tail ``Σ_{i>r} σ_i(S W)²``. We take ``S = Cᵀ``
from the Cholesky factor ``C Cᵀ = G + δ I`` (an O(in³/3) factorization, much cheaper than an
eigendecomposition of a 3072 × 3072 Gram).

Rule for rank-deficient or ill-conditioned Grams (adaptive damping): ``δ = ε · mean(diag G)``
with ``ε`` starting at 1e-10 and multiplied by 10 until the Cholesky succeeds (at most ``ε = 1``).
The method then minimises ``‖X (W − M)‖² + δ ‖W − M‖²``: for a well-conditioned Gram this is the
DRONE objective up to a relative 1e-10, and in directions that no calibration token excites it
falls back to plain least squares instead of dividing by zero. A Gram that is all zeros carries no
information, so the plain SVD is used.

ASVD (activation-aware SVD) scales input feature ``j`` by ``mean|x_j|^α`` before the SVD and
undoes the scaling on the left factor; it minimises ``‖diag(s^α) (W − M)‖_F``. Zero statistics are
floored at 1e-6 of the largest scale so the unscaling stays finite.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.linalg

from factorlm.decompose._transform import Transform, floored_scale, lowrank_from_transform
from factorlm.decompose._validate import (
    DecompositionError,
    check_alpha,
    check_rank,
    check_vector,
    check_weight,
)
from factorlm.decompose.svd import LowRank, SvdMethod

__all__ = [
    "activation_scaled_svd",
    "asvd_transform",
    "check_gram",
    "check_output_gram",
    "whiten_transform",
    "whitened_svd",
]

logger = logging.getLogger(__name__)

_DAMPING_START = 1e-10
_DAMPING_MAX = 1.0


def check_gram(gram: Any, in_features: int) -> np.ndarray:
    """Return ``gram`` as a symmetric float64 ``(in, in)`` matrix, or raise naming the problem."""
    if not isinstance(gram, np.ndarray):
        raise DecompositionError(f"gram must be a numpy array, got {type(gram).__name__}.")
    if gram.shape != (in_features, in_features):
        raise DecompositionError(
            f"gram has shape {gram.shape} but the weight needs ({in_features}, {in_features}) "
            "(XᵀX over its input features)."
        )
    if not np.issubdtype(gram.dtype, np.number) or np.iscomplexobj(gram):
        raise DecompositionError(f"gram must be real numbers, got dtype {gram.dtype}.")
    g = gram.astype(np.float64)
    if not np.isfinite(g).all():
        raise DecompositionError("gram contains NaN or Inf values.")
    if (np.diag(g) < 0).any():
        raise DecompositionError("gram has a negative diagonal entry; XᵀX is never so.")
    return 0.5 * (g + g.T)


#: Relative tolerance of ``check_output_gram``: a sum of outer products ``Σ g gᵀ`` is symmetric and
#: positive semidefinite up to rounding far below this.
_OUTPUT_GRAM_TOLERANCE = 1e-6


def check_output_gram(gram: Any, out_features: int) -> np.ndarray:
    """Return ``gram`` (the output-gradient Gram ``Σ_t g_t g_tᵀ``) as a symmetric float64
    ``(out, out)`` matrix, or raise with one sentence naming the problem.

    Positive semidefiniteness is checked up to rounding (a Cholesky of ``gram + 1e-6 · mean
    diag · I``, no eigendecomposition), so a statistic summed in float64 always passes.
    """
    if not isinstance(gram, np.ndarray):
        raise DecompositionError(f"output_gram must be a numpy array, got {type(gram).__name__}.")
    if gram.shape != (out_features, out_features):
        raise DecompositionError(
            f"output_gram has shape {gram.shape} but the weight needs ({out_features}, "
            f"{out_features}) (Σ g gᵀ over its output features)."
        )
    if not np.issubdtype(gram.dtype, np.number) or np.iscomplexobj(gram):
        raise DecompositionError(f"output_gram must be real numbers, got dtype {gram.dtype}.")
    h = gram.astype(np.float64)
    if not np.isfinite(h).all():
        raise DecompositionError("output_gram contains NaN or Inf values.")
    top = float(np.abs(h).max())
    if float(np.abs(h - h.T).max()) > _OUTPUT_GRAM_TOLERANCE * top:
        raise DecompositionError(
            "output_gram is not symmetric; Σ g gᵀ always is (was it transposed or truncated?)."
        )
    h = 0.5 * (h + h.T)
    scale = float(np.mean(np.diag(h)))
    semidefinite = top == 0.0  # a zero diagonal leaves only the zero matrix
    if scale > 0.0:
        try:
            np.linalg.cholesky(h + (_OUTPUT_GRAM_TOLERANCE * scale) * np.eye(out_features))
            semidefinite = True
        except np.linalg.LinAlgError:
            semidefinite = False
    if not semidefinite:
        raise DecompositionError(
            "output_gram is not positive semidefinite (a Gram Σ g gᵀ of gradients never has a "
            "negative eigenvalue)."
        )
    return h


def _damped_cholesky(gram: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Lower Cholesky factor of ``gram + δI`` by the adaptive-damping rule, or None if G = 0."""
    scale = float(np.mean(np.diag(gram)))
    if scale == 0.0:
        return None
    eps = _DAMPING_START
    identity = np.eye(gram.shape[0])
    while eps <= _DAMPING_MAX:
        delta = eps * scale
        try:
            return np.linalg.cholesky(gram + delta * identity), delta
        except np.linalg.LinAlgError:
            eps *= 10.0
    raise DecompositionError(
        "gram is not positive semidefinite: its Cholesky fails even with damping of its mean "
        "diagonal."
    )


def whiten_transform(weight: np.ndarray, gram: np.ndarray) -> Transform:
    """``Z = Cᵀ W`` with ``C Cᵀ = G + δI`` (float64 inputs, gram already checked)."""
    factor = _damped_cholesky(gram)
    if factor is None:
        logger.debug("gram is all zeros; whitening falls back to the plain SVD")
        return Transform(weight)
    chol, delta = factor
    logger.debug("whitening with damping δ=%.3g", delta)
    upper = chol.T

    def undo_left(left: np.ndarray) -> np.ndarray:
        return scipy.linalg.solve_triangular(upper, left, lower=False, check_finite=False)

    return Transform(upper @ weight, undo_left=undo_left)


def whitened_svd(
    W: np.ndarray,
    rank: int,
    gram: np.ndarray,
    *,
    rng: np.random.Generator | None = None,
    method: SvdMethod = "auto",
) -> LowRank:
    """Rank-``rank`` ``M`` minimising ``‖X (W − M)‖_F`` given ``gram = XᵀX`` (DRONE / SVD-LLM)."""
    weight = check_weight(W)
    r = check_rank(rank, weight.shape)
    g = check_gram(gram, weight.shape[0])
    transform = whiten_transform(weight.astype(np.float64), g)
    return lowrank_from_transform(transform, r, weight.dtype, rng=rng, method=method)


def asvd_transform(weight: np.ndarray, mean_abs: np.ndarray, alpha: float) -> Transform:
    """``Z = diag(s) W`` with ``s = mean_abs^α`` floored at 1e-6 of its maximum."""
    scale = floored_scale(mean_abs, alpha)
    if scale is None:
        logger.debug("mean_abs is all zeros; ASVD falls back to the plain SVD")
        return Transform(weight)

    def undo_left(left: np.ndarray) -> np.ndarray:
        return left / scale[:, None]

    return Transform(scale[:, None] * weight, undo_left=undo_left)


def activation_scaled_svd(
    W: np.ndarray,
    rank: int,
    mean_abs: np.ndarray,
    alpha: float = 0.5,
    *,
    rng: np.random.Generator | None = None,
    method: SvdMethod = "auto",
) -> LowRank:
    """ASVD: truncate ``diag(mean_abs^α) W`` and undo the scaling on the left factor."""
    weight = check_weight(W)
    r = check_rank(rank, weight.shape)
    stats = check_vector(mean_abs, weight.shape[0], "mean_abs", what="mean |x| per input feature")
    transform = asvd_transform(weight.astype(np.float64), stats, check_alpha(alpha))
    return lowrank_from_transform(transform, r, weight.dtype, rng=rng, method=method)
