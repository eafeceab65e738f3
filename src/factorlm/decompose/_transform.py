"""The shape every data-aware method shares: truncate a transformed matrix, then undo it.

Each method minimises ``‖A (W − M) B‖_F`` over rank-r ``M`` for invertible ``A`` (input side) and
``B`` (output side): the optimum is ``M = A⁻¹ [A W B]_r B⁻¹`` where ``[·]_r`` is the truncated
SVD. A ``Transform`` holds ``Z = A W B`` and the two inverse maps, so the methods differ only in
how they build ``A`` and ``B``, and ``spectrum`` can return the singular values of ``Z`` without
computing any factor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from factorlm.decompose._validate import cast_back
from factorlm.decompose.svd import LowRank, SvdMethod, factors_from_svd, svd_rank

__all__ = ["Transform", "floored_scale", "lowrank_from_transform"]

logger = logging.getLogger(__name__)

_SCALE_FLOOR = 1e-6  # smallest diagonal scale, relative to the largest: keeps the inverse finite


def floored_scale(values: np.ndarray, power: float) -> np.ndarray | None:
    """``values**power`` floored at ``_SCALE_FLOOR`` of its maximum, or None when all zero.

    The diagonal ``A`` (ASVD, ``mean_abs^α``) or ``B`` (FWSVD, ``√fisher``); None stands for the
    identity: an all-zero statistic carries no information and gives the plain SVD.
    """
    scale = values**power
    top = float(scale.max()) if scale.size else 0.0
    if top == 0.0:
        return None
    return np.maximum(scale, _SCALE_FLOOR * top)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclass(frozen=True, eq=False)
class Transform:
    """``matrix = A W B`` in float64, with ``undo_left(F) = A⁻¹ F`` and ``undo_right(G) = G B⁻¹``."""

    matrix: np.ndarray
    undo_left: Callable[[np.ndarray], np.ndarray] = _identity
    undo_right: Callable[[np.ndarray], np.ndarray] = _identity


def lowrank_from_transform(
    transform: Transform,
    rank: int,
    dtype: np.dtype[Any],
    *,
    rng: np.random.Generator | None = None,
    method: SvdMethod = "auto",
) -> LowRank:
    """Truncate ``transform.matrix`` to ``rank``, undo the transform, cast to ``dtype``."""
    sketch = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    u, s, vt = svd_rank(transform.matrix, rank, rng=rng, method=method, sketch_dtype=sketch)
    left, right = factors_from_svd(u, s, vt)
    left = transform.undo_left(left)
    right = transform.undo_right(right)
    return LowRank(left=cast_back(left, dtype, "left"), right=cast_back(right, dtype, "right"))
