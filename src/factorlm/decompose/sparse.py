"""Low-rank plus sparse: ``W ≈ L R + S`` with ``S`` a pruned residual a backend can execute.

LoSparse-style, training-free: the low-rank part is the truncated SVD of ``W − S`` and ``S`` keeps
the largest-magnitude entries of ``W − L R`` allowed by the structure. ``iterations > 1``
alternates the two exact block minimisations (GoDec), which never increases the error.

Structures (``W: (in, out)``, ``y = x @ W``):
- ``unstructured``: the ``round(density · in · out)`` largest residual entries.
- ``column``: whole input features (rows of ``W``): the ``round(density · in)`` rows with the
  largest residual norm, stored compactly as ``rows`` (sorted int64) and ``values``; at run time
  ``x[:, rows] @ values`` is a small dense MatMul.
- ``2:4``: at most two non-zeros in every group of four consecutive input features, per output
  column, i.e. along the reduction axis as TensorRT's structured sparsity needs (a trailing
  partial group also keeps at most two). ``density`` may not exceed 0.5; below it, the largest
  entries of the 2:4 pattern are kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from factorlm.decompose._validate import DecompositionError, cast_back, check_rank, check_weight
from factorlm.decompose.svd import LowRank, factors_from_svd, svd_rank

__all__ = ["LowRankSparse", "SparseStructure", "lowrank_plus_sparse"]

logger = logging.getLogger(__name__)

SparseStructure = Literal["unstructured", "column", "2:4"]
_STRUCTURES = ("unstructured", "column", "2:4")


@dataclass(frozen=True, eq=False)
class LowRankSparse:
    """``W ≈ low_rank.reconstruct() + residual``; ``rows``/``values`` are set for ``column``."""

    low_rank: LowRank
    structure: str
    residual: np.ndarray
    rows: np.ndarray | None = None
    values: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(in, out)`` of the approximated weight."""
        return self.low_rank.shape

    @property
    def nnz(self) -> int:
        """Stored non-zero values of the sparse part."""
        if self.values is not None:
            return int(self.values.size)
        return int(np.count_nonzero(self.residual))

    @property
    def num_params(self) -> int:
        """Low-rank parameters plus stored sparse values (indices are not parameters)."""
        return self.low_rank.num_params + self.nnz

    @property
    def flops_per_token(self) -> int:
        """``2 ·`` multiply-adds of the low-rank path plus one per stored sparse value."""
        return self.low_rank.flops_per_token + 2 * self.nnz

    def reconstruct(self) -> np.ndarray:
        """Dense ``L R + S`` (float64 sum, returned in the factors' dtype)."""
        dense = self.low_rank.left.astype(np.float64) @ self.low_rank.right.astype(np.float64)
        return (dense + self.residual.astype(np.float64)).astype(self.low_rank.left.dtype)


def _keep_largest(values: np.ndarray, mask: np.ndarray, count: int) -> np.ndarray:
    """Mask of the ``count`` largest ``|values|`` inside ``mask`` (stable, ties to lower index)."""
    flat = np.where(mask, np.abs(values), -1.0).ravel()
    count = min(count, int(mask.sum()))
    keep = np.zeros(flat.shape, dtype=bool)
    if count > 0:
        order = np.argsort(-flat, kind="stable")[:count]
        keep[order] = True
    return keep.reshape(values.shape)


def _two_four_mask(residual: np.ndarray) -> np.ndarray:
    """Per output column, the two largest ``|r|`` of every group of four input features."""
    m, n = residual.shape
    groups = -(-m // 4)
    padded = np.full((groups * 4, n), -1.0)
    padded[:m] = np.abs(residual)
    blocks = padded.reshape(groups, 4, n)
    order = np.argsort(-blocks, axis=1, kind="stable")[:, :2, :]
    mask = np.zeros_like(blocks, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask.reshape(groups * 4, n)[:m]


def _prune(
    residual: np.ndarray, density: float, structure: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """The structured sparse part of ``residual`` and, for ``column``, the kept rows."""
    m, n = residual.shape
    if structure == "column":
        count = round(density * m)
        norms = np.linalg.norm(residual, axis=1)
        rows = np.sort(np.argsort(-norms, kind="stable")[:count]).astype(np.int64)
        sparse = np.zeros_like(residual)
        sparse[rows] = residual[rows]
        return sparse, rows
    allowed = _two_four_mask(residual) if structure == "2:4" else np.ones((m, n), dtype=bool)
    keep = _keep_largest(residual, allowed, round(density * m * n))
    return np.where(keep, residual, 0.0), None


def lowrank_plus_sparse(
    W: np.ndarray,
    rank: int,
    density: float,
    structure: SparseStructure = "unstructured",
    *,
    iterations: int = 1,
) -> LowRankSparse:
    """``W ≈ L R + S`` with rank-``rank`` ``L R`` and a ``structure``-sparse ``S`` of ``density``."""
    weight = check_weight(W)
    r = check_rank(rank, weight.shape)
    if structure not in _STRUCTURES:
        raise DecompositionError(
            f"structure {structure!r} is unknown; use 'unstructured', 'column' or '2:4'."
        )
    limit = 0.5 if structure == "2:4" else 1.0
    if not (isinstance(density, int | float) and 0.0 <= density <= limit):
        raise DecompositionError(
            f"density {density!r} is out of range for structure {structure!r}: it must be in "
            f"[0, {limit}]."
        )
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise DecompositionError(f"iterations must be a positive integer, got {iterations!r}.")
    w64 = weight.astype(np.float64)
    sparse = np.zeros_like(w64)
    rows: np.ndarray | None = None
    for _ in range(iterations):
        u, s, vt = svd_rank(w64 - sparse, r)
        left, right = factors_from_svd(u, s, vt)
        # Prune against the factors as they will be stored, so S absorbs the cast error too.
        left_c = cast_back(left, weight.dtype, "left")
        right_c = cast_back(right, weight.dtype, "right")
        low = left_c.astype(np.float64) @ right_c.astype(np.float64)
        sparse, rows = _prune(w64 - low, float(density), structure)
    residual = cast_back(sparse, weight.dtype, "sparse")
    values = residual[rows] if rows is not None else None
    logger.debug(
        "low-rank+sparse %s: rank %d, %d non-zeros", structure, r, np.count_nonzero(residual)
    )
    return LowRankSparse(
        low_rank=LowRank(left=left_c, right=right_c),
        structure=structure,
        residual=residual,
        rows=rows,
        values=values,
    )
