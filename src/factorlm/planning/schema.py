"""The plan as data: one entry per weight, the plan around them, and its JSON form.

A plan is JSON keyed by initializer name that a user can read, edit (a rank, a method,
Kronecker shapes) and pass back with ``--plan``. This module also names what planning reads of
its inputs (``CandidateLike``, ``AnalysisLike``, ``StatsLike``) as protocols, so planning needs
no graph code: ``factorlm.passes.analysis`` produces objects of these shapes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from factorlm._common.userfiles import check_fields, parse_json, read_text
from factorlm.decompose import METHODS
from factorlm.errors import PlanError
from factorlm.options import DATA_AWARE_METHODS

__all__ = [
    "ALL_METHODS",
    "DATA_AWARE",
    "PLAN_FORMAT",
    "SPARSE_STRUCTURES",
    "AnalysisLike",
    "CandidateLike",
    "Plan",
    "SkippedLike",
    "StatsLike",
    "UseLike",
    "WeightPlan",
    "load_plan",
    "new_entry",
]

logger = logging.getLogger(__name__)

PLAN_FORMAT = "factorlm.plan/1"
ALL_METHODS: tuple[str, ...] = (*METHODS, "kron", "losparse")
#: Method -> the statistic it needs (CalibrationStats field): the one definition in options.
DATA_AWARE = DATA_AWARE_METHODS
SPARSE_STRUCTURES = ("column", "unstructured", "2:4")


class StatsLike(Protocol):
    """What planning reads from ``factorlm.calibration.CalibrationStats``."""

    gram: dict[str, np.ndarray]
    mean_abs: dict[str, np.ndarray]
    fisher: dict[str, np.ndarray]


class UseLike(Protocol):
    """What planning reads of one use of a weight (``factorlm.passes.analysis.Use``)."""

    @property
    def form(self) -> str: ...


class CandidateLike(Protocol):
    """What planning reads of a factorizable weight (``factorlm.passes.analysis.Candidate``)."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def stored_shape(self) -> tuple[int, int]: ...

    @property
    def uses(self) -> Sequence[UseLike]: ...

    @property
    def members(self) -> tuple[str, ...]: ...

    @property
    def node_names(self) -> list[str]: ...

    def matrix(self) -> np.ndarray: ...


class SkippedLike(Protocol):
    """A weight the analysis left alone (``factorlm.passes.analysis.Skipped``)."""

    @property
    def name(self) -> str: ...

    @property
    def reason(self) -> str: ...

    @property
    def nodes(self) -> tuple[str, ...]: ...


class AnalysisLike(Protocol):
    """What planning reads of a model's analysis (``factorlm.passes.analysis.Analysis``)."""

    @property
    def candidates(self) -> Sequence[CandidateLike]: ...

    @property
    def skipped(self) -> Sequence[SkippedLike]: ...

    def candidate(self, name: str) -> CandidateLike | None: ...


@dataclass
class WeightPlan:
    """One weight's entry. ``rank`` for low-rank methods, ``kron`` / ``sparse`` for the others."""

    nodes: list[str]
    kind: str
    shape: list[int]  # (in, out) as the decomposition sees it
    stored_shape: list[int]
    method: str
    rank: int | None = None
    kron: dict[str, Any] | None = None  # {"a_shape": [a_in, a_out], "b_shape": [...], "terms": t}
    sparse: dict[str, Any] | None = None  # {"structure": ..., "density": ...}
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    expected_error: float | None = None  # relative (data-aware when stats exist) Frobenius error
    # Latency-targeted plans only (``planning.latency``): measured ms of the dense weight and
    # predicted ms of its factored form, on the cost model's engine configuration.
    dense_ms: float | None = None
    predicted_ms: float | None = None


@dataclass
class Plan:
    """Weights to factorize (keyed by initializer name), weights left dense, and the budget.

    ``dense`` lists the weights the budget covers but the allocation left dense, with their
    ``{"params": ..., "flops": ...}``, so ``totals`` spans every targeted weight and
    ``params_after / params_before`` is the achieved ratio.
    """

    method: str
    budget: dict[str, Any]
    weights: dict[str, WeightPlan] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    dense: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Latency-targeted plans only: the prediction (model_ms, predicted_ms, predicted_speedup,
    #: target_ms, dense_weights {name: ms}, config); None for parameter-budget plans.
    latency: dict[str, Any] | None = None

    def totals(self) -> dict[str, int]:
        """Parameters and FLOPs per token of the targeted weights (factorized + kept dense)."""
        keys = ("params_before", "params_after", "flops_before", "flops_after")
        out = {k: sum(int(getattr(w, k)) for w in self.weights.values()) for k in keys}
        for name, cost in self.dense.items():
            if name in self.weights:
                continue
            for side in ("before", "after"):
                out[f"params_{side}"] += int(cost.get("params", 0))
                out[f"flops_{side}"] += int(cost.get("flops", 0))
        return out

    def to_json(self) -> str:
        data = {
            "format": PLAN_FORMAT,
            "method": self.method,
            "budget": self.budget,
            "totals": self.totals(),
            "weights": {name: _entry_json(w) for name, w in self.weights.items()},
            "skipped": self.skipped,
            "dense": self.dense,
        }
        if self.latency is not None:
            data["latency"] = self.latency
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "plan") -> Plan:
        """Parse a plan, raising PlanError that names the file and the bad entry."""
        data = parse_json(text, source=source, error=PlanError)
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source} is not a factorlm plan (expected format {PLAN_FORMAT!r}).")
        weights_raw = data.get("weights")
        if not isinstance(weights_raw, dict):
            raise PlanError(f"{source} has no 'weights' object.")
        known = set(WeightPlan.__dataclass_fields__)
        weights: dict[str, WeightPlan] = {}
        for name, entry in weights_raw.items():
            if not isinstance(entry, dict):
                raise PlanError(f"{source}: entry {name!r} is not an object.")
            unknown = set(entry) - known
            if unknown:
                raise PlanError(f"{source}: entry {name!r} has unknown keys {sorted(unknown)}.")
            check_fields(entry, WeightPlan, where=f"{source}: entry {name!r}", error=PlanError)
            try:
                weights[name] = WeightPlan(**entry)
            except TypeError:
                raise PlanError(
                    f"{source}: entry {name!r} lacks 'nodes', 'kind', 'shape', 'stored_shape' or 'method'."
                ) from None
        skipped = data.get("skipped") or {}
        dense_raw = data.get("dense") or {}
        if not isinstance(skipped, dict) or not isinstance(data.get("budget") or {}, dict):
            raise PlanError(f"{source}: 'skipped' and 'budget' must be objects.")
        if not isinstance(dense_raw, dict) or not all(
            isinstance(v, dict) and all(isinstance(x, int | float) for x in v.values())
            for v in dense_raw.values()
        ):
            raise PlanError(f"{source}: 'dense' must map weight names to {{'params', 'flops'}}.")
        latency = data.get("latency")
        if latency is not None and not isinstance(latency, dict):
            raise PlanError(f"{source}: 'latency' must be an object.")
        return cls(
            method=str(data.get("method", "svd")),
            budget=dict(data.get("budget") or {}),
            weights=weights,
            skipped={str(k): str(v) for k, v in skipped.items()},
            dense={str(k): {kk: int(vv) for kk, vv in v.items()} for k, v in dense_raw.items()},
            latency=latency,
        )


def _entry_json(entry: WeightPlan) -> dict[str, Any]:
    """An entry as JSON; the latency fields only when set, so other plans read as before."""
    data = asdict(entry)
    for key in ("dense_ms", "predicted_ms"):
        if data[key] is None:
            del data[key]
    return data


def load_plan(plan: Plan | str | os.PathLike[str]) -> Plan:
    """A Plan object, or one read from a JSON file (PlanError naming the file otherwise)."""
    if isinstance(plan, Plan):
        return plan
    path = Path(plan)
    if not path.is_file():
        raise PlanError(f"plan file {path} does not exist.")
    text = read_text(path, what="plan file", error=PlanError)
    return Plan.from_json(text, source=f"plan file {path}")


def new_entry(cand: CandidateLike, method: str, **fields: Any) -> WeightPlan:
    """A plan entry for ``cand`` that records its uses, kind and shapes as the analysis saw them."""
    return WeightPlan(
        nodes=cand.node_names,
        kind=cand.kind,
        shape=list(cand.shape),
        stored_shape=list(cand.stored_shape),
        method=method,
        **fields,
    )
