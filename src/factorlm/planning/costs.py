"""The cost model of a plan entry: parameters stored and FLOPs per token, before and after.

Costs follow docs/CONTRACTS.md: parameters stored, and FLOPs per token ``2·multiply-adds``. A
token embedding's Gather costs no FLOPs; factorized, its lookup adds the ``r × d`` MatMul. One
place computes them so a fresh plan and a validated (user-edited) plan count the same way.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from factorlm.decompose import kronecker_cost
from factorlm.planning.schema import CandidateLike, WeightPlan

__all__ = ["dense_cost", "fill_costs", "relative_error"]

logger = logging.getLogger(__name__)


def fill_costs(cand: CandidateLike, entry: WeightPlan) -> None:
    """Fill params/FLOPs before and after for ``entry`` (in place)."""
    m, n = cand.shape
    # A joint candidate's members each compute their own slice of one product with the whole
    # matrix (one shared down-projection once factorized): one linear use, and no lookups.
    gathers = sum(1 for u in cand.uses if u.form == "gather")
    linear_uses = 1 if cand.members else len(cand.uses) - gathers
    entry.params_before = m * n
    entry.flops_before = 2 * m * n * linear_uses
    if entry.method == "kron" and entry.kron is not None:
        a_shape, b_shape = entry.kron["a_shape"], entry.kron["b_shape"]
        entry.params_after, entry.flops_after = kronecker_cost(
            (int(a_shape[0]), int(a_shape[1])),
            (int(b_shape[0]), int(b_shape[1])),
            int(entry.kron["terms"]),
        )
        return
    r = int(entry.rank or 0)
    entry.params_after = r * (m + n)
    # A lookup adds its r × d MatMul; d is the stored embedding's width (the core of one tied
    # to an LM head is Eᵀ, so ``n`` is the vocabulary there).
    width = cand.stored_shape[1] if gathers else n
    entry.flops_after = 2 * r * (m + n) * linear_uses + 2 * r * width * gathers
    if entry.method == "losparse" and entry.sparse is not None:
        structure, density = entry.sparse["structure"], float(entry.sparse["density"])
        if structure == "column":
            k = round(density * m)
            entry.params_after += k * n
            entry.flops_after += 2 * k * n
        else:  # stored and executed as a dense residual matrix
            entry.params_after += m * n
            entry.flops_after += 2 * m * n


def dense_cost(cand: CandidateLike) -> dict[str, int]:
    """Parameters and FLOPs per token of a targeted weight that stays dense."""
    entry = WeightPlan(
        nodes=[], kind=cand.kind, shape=list(cand.shape), stored_shape=[], method="svd", rank=0
    )
    fill_costs(cand, entry)
    return {"params": entry.params_before, "flops": entry.flops_before}


def relative_error(s: np.ndarray, rank: int) -> float:
    """Relative Frobenius error of keeping the first ``rank`` of singular values ``s``."""
    power = s.astype(np.float64) ** 2
    total = float(power.sum())
    return math.sqrt(float(power[rank:].sum()) / total) if total > 0 else 0.0
