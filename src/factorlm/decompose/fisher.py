"""Fisher-weighted SVD (FWSVD, Hsu et al. 2022) on the output side.

With ``I_j`` the Fisher information summed over the weights feeding output feature ``j``
(``y = x @ W``, so column ``j`` of ``W``), FWSVD minimises the weighted error
``Σ_j I_j ‖W[:, j] − M[:, j]‖² = ‖(W − M) D‖_F²`` with ``D = diag(√I)``. The optimum over rank-r
``M`` is ``[W D]_r D⁻¹``: truncate the weighted matrix, undo the weighting on the right factor.
Zero Fisher entries are floored at 1e-6 of the largest ``√I`` so the unweighting stays finite;
an all-zero Fisher vector carries no information and gives the plain SVD.
"""

from __future__ import annotations

import logging

import numpy as np

from factorlm.decompose._transform import Transform, floored_scale, lowrank_from_transform
from factorlm.decompose._validate import check_rank, check_vector, check_weight
from factorlm.decompose.svd import LowRank, SvdMethod

__all__ = ["fisher_transform", "fisher_weighted_svd"]

logger = logging.getLogger(__name__)


def fisher_transform(weight: np.ndarray, fisher: np.ndarray) -> Transform:
    """``Z = W diag(√fisher)`` (floored), with the inverse applied to the right factor."""
    root = floored_scale(fisher, 0.5)
    if root is None:
        logger.debug("fisher is all zeros; FWSVD falls back to the plain SVD")
        return Transform(weight)

    def undo_right(right: np.ndarray) -> np.ndarray:
        return right / root[None, :]

    return Transform(weight * root[None, :], undo_right=undo_right)


def fisher_weighted_svd(
    W: np.ndarray,
    rank: int,
    fisher: np.ndarray,
    *,
    rng: np.random.Generator | None = None,
    method: SvdMethod = "auto",
) -> LowRank:
    """FWSVD: rank-``rank`` ``M`` minimising ``Σ_j fisher_j ‖W[:, j] − M[:, j]‖²``."""
    weight = check_weight(W)
    r = check_rank(rank, weight.shape)
    stats = check_vector(
        fisher, weight.shape[1], "fisher", what="Fisher row sums per output feature"
    )
    transform = fisher_transform(weight.astype(np.float64), stats)
    return lowrank_from_transform(transform, r, weight.dtype, rng=rng, method=method)
