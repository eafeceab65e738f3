"""Check a (user-edited) plan against the model and recompute its costs.

A plan read with ``--plan`` may name weights the model lacks, a method that does not apply to a
weight, or ranks and Kronecker shapes out of range: each is a ``PlanError`` naming the entry.
"""

from __future__ import annotations

import logging

from factorlm.errors import PlanError
from factorlm.planning.costs import dense_cost, fill_costs
from factorlm.planning.kronecker import supports_kronecker
from factorlm.planning.lowrank import supports_lowrank_sparse
from factorlm.planning.schema import (
    ALL_METHODS,
    DATA_AWARE,
    SPARSE_STRUCTURES,
    AnalysisLike,
    CandidateLike,
    Plan,
    WeightPlan,
)

__all__ = ["validate_plan"]

logger = logging.getLogger(__name__)


def validate_plan(plan: Plan, analysis: AnalysisLike) -> Plan:
    """Check a (user-edited) plan against the model and recompute its costs; PlanError if wrong."""
    skipped = {s.name: s.reason for s in analysis.skipped}
    for name, entry in plan.weights.items():
        cand = analysis.candidate(name)
        if cand is None:
            if name in skipped:
                raise PlanError(f"plan weight {name!r} cannot be factorized: it {skipped[name]}.")
            raise PlanError(f"plan names initializer {name!r}, which is not in the model.")
        if entry.method not in ALL_METHODS:
            raise PlanError(
                f"plan weight {name!r} has unknown method {entry.method!r}; use one of {', '.join(ALL_METHODS)}."
            )
        # An embedding tied to an LM head can be weighted by the head's input statistics.
        tied = any(use.form != "gather" for use in cand.uses)
        if (
            cand.kind == "embedding"
            and entry.method != "svd"
            and not (tied and entry.method in DATA_AWARE)
        ):
            raise PlanError(
                f"plan weight {name!r} is a token embedding; only method 'svd' applies to it "
                f"(or a data-aware low-rank method, {', '.join(DATA_AWARE)}, when an LM head is "
                "tied to it)."
            )
        if cand.members and entry.method in ("kron", "losparse"):
            raise PlanError(
                f"plan weight {name!r} is a joint Q/K/V weight; method {entry.method!r} does not "
                "apply to it (use a low-rank method, or plan its members separately)."
            )
        if entry.shape and list(entry.shape) != list(cand.shape):
            raise PlanError(
                f"plan weight {name!r} has shape {list(entry.shape)}, but the model's is "
                f"{list(cand.shape)}: the plan was made for another model."
            )
        entry.nodes, entry.kind = cand.node_names, cand.kind
        entry.shape, entry.stored_shape = list(cand.shape), list(cand.stored_shape)
        m, n = cand.shape
        if entry.method == "kron":
            _validate_kron(name, entry, cand)
        else:
            rank = entry.rank
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
                raise PlanError(
                    f"plan weight {name!r} has rank {rank!r}, out of range: it must be an integer in [1, {min(m, n)}]."
                )
        if entry.method == "losparse":
            reason = supports_lowrank_sparse(cand)
            sparse = entry.sparse or {}
            if reason is not None:
                raise PlanError(f"plan weight {name!r}: {reason}.")
            if sparse.get("structure") not in SPARSE_STRUCTURES or not isinstance(
                sparse.get("density"), int | float
            ):
                raise PlanError(
                    f"plan weight {name!r} needs sparse {{'structure': one of {list(SPARSE_STRUCTURES)}, 'density': number}}."
                )
        fill_costs(cand, entry)
    dense: dict[str, dict[str, int]] = {}
    for name in plan.dense:
        cand = analysis.candidate(name)
        if cand is not None and name not in plan.weights:
            dense[name] = dense_cost(cand)
    plan.dense = dense
    return plan


def _validate_kron(name: str, entry: WeightPlan, cand: CandidateLike) -> None:
    reason = supports_kronecker(cand)
    if reason is not None:
        raise PlanError(f"plan weight {name!r}: {reason}.")
    kron = entry.kron or {}
    try:
        (a_in, a_out), (b_in, b_out) = kron["a_shape"], kron["b_shape"]
        terms = int(kron["terms"])
    except (KeyError, TypeError, ValueError):
        raise PlanError(
            f"plan weight {name!r} needs kron {{'a_shape': [i, o], 'b_shape': [i, o], 'terms': t}}."
        ) from None
    m, n = cand.shape
    if a_in * b_in != m or a_out * b_out != n:
        raise PlanError(
            f"plan weight {name!r}: Kronecker shapes {[a_in, a_out]} x {[b_in, b_out]} do not make its shape {[m, n]}."
        )
    if not 1 <= terms <= min(a_in * a_out, b_in * b_out):
        raise PlanError(f"plan weight {name!r} has {terms} Kronecker terms, out of range.")
