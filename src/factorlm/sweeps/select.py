"""Trial results and the selection rule: the best trial under constraints, and the Pareto front.

A trial's ``speedup`` is its slowest shape's paired speedup (the figure a ``min_speedup`` goal
must hold for), and its ``quality`` is the benchmark task's metric of the compressed engine, with
the task's own direction (accuracy: higher is better, perplexity: lower is better).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from factorlm.sweeps.config import SelectRule

__all__ = ["Selection", "TrialResult", "metric_value", "pareto_front", "select"]


@dataclass
class TrialResult:
    """What one trial produced (or why it failed), as stored in ``trials/<id>/trial.json``."""

    id: str
    params: dict[str, Any]
    status: str  # "done" | "failed"
    error: str | None = None
    metric: str | None = None  # the task metric's name, e.g. accuracy_percent, perplexity
    higher_is_better: bool | None = None
    quality: float | None = None
    reference_quality: float | None = None
    drop: float | None = None
    drop_unit: str | None = None
    speedup: float | None = None
    speedups: dict[str, float] = field(default_factory=dict)
    passed: bool | None = None  # the run config's own benchmark goals
    seconds: float = 0.0
    node: str | None = None
    output_dir: str | None = None
    reused_stages: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "done"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialResult:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def metric_value(result: TrialResult, metric: str) -> float | None:
    """The trial's value of a rule metric (None when the trial has no such figure)."""
    if not result.ok:
        return None
    name = result.metric or ""
    if metric == "speedup":
        return _finite(result.speedup)
    if metric == "drop":
        return _finite(result.drop)
    if metric == "accuracy":
        return _finite(result.quality) if name.startswith("accuracy") else None
    if metric == "perplexity":
        return _finite(result.quality) if name == "perplexity" else None
    if metric == "quality":
        return _finite(result.quality)
    raise ValueError(f"unknown metric {metric!r}")


def _goodness(result: TrialResult) -> float | None:
    """Quality oriented so that larger is better (perplexity negated)."""
    value = metric_value(result, "quality")
    if value is None:
        return None
    return value if result.higher_is_better is not False else -value


def _feasible(result: TrialResult, rule: SelectRule) -> bool:
    if not result.ok:
        return False
    bounds = rule.subject_to
    checks = (
        (bounds.min_speedup, metric_value(result, "speedup"), 1.0),
        (bounds.max_drop, metric_value(result, "drop"), -1.0),
        (bounds.min_accuracy, metric_value(result, "accuracy"), 1.0),
        (bounds.max_perplexity, metric_value(result, "perplexity"), -1.0),
    )
    for bound, value, sign in checks:
        if bound is None:
            continue
        if value is None or sign * (value - bound) < 0:
            return False
    return True


def pareto_front(results: Sequence[TrialResult]) -> list[TrialResult]:
    """Trials no other trial beats on both speedup and quality, fastest first."""
    points = [
        (r, s, g)
        for r in results
        if (s := metric_value(r, "speedup")) is not None and (g := _goodness(r)) is not None
    ]
    front = [
        r
        for r, s, g in points
        if not any(s2 >= s and g2 >= g and (s2 > s or g2 > g) for _, s2, g2 in points)
    ]
    return sorted(front, key=lambda r: (-(r.speedup or 0.0), r.id))


@dataclass
class Selection:
    """The outcome of the rule: the best trial (None: no trial meets it) and the front."""

    best: TrialResult | None
    front: list[TrialResult]
    feasible: list[TrialResult]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": self.best.id if self.best else None,
            "pareto_front": [r.id for r in self.front],
            "feasible": [r.id for r in self.feasible],
            "reason": self.reason,
        }


def _describe(rule: SelectRule) -> str:
    if rule.pareto:
        what = "the quality/speedup Pareto front (best quality on it)"
    elif rule.maximize:
        what = f"maximize {rule.maximize}"
    else:
        what = f"minimize {rule.minimize}"
    bounds = {k: v for k, v in rule.subject_to.model_dump().items() if v is not None}
    if bounds:
        what += " subject to " + ", ".join(f"{k}={v}" for k, v in bounds.items())
    return what


def select(results: Sequence[TrialResult], rule: SelectRule) -> Selection:
    """Apply ``rule`` to the finished trials; ties go to the faster trial, then the smaller id."""
    feasible = [r for r in results if _feasible(r, rule)]
    front = pareto_front(feasible)
    rule_text = _describe(rule)
    done = sum(r.ok for r in results)
    if rule.pareto:
        scored = [(g, r) for r in front if (g := _goodness(r)) is not None]
    else:
        metric = rule.maximize or rule.minimize
        assert metric is not None
        sign = 1.0 if rule.maximize else -1.0

        def value(r: TrialResult) -> float | None:
            # "quality" is better quality: perplexity counts downwards
            return _goodness(r) if metric == "quality" else metric_value(r, metric)

        scored = [(sign * v, r) for r in feasible if (v := value(r)) is not None]
    if not scored:
        reason = (
            f"no trial meets the rule ({rule_text}): {done} of {len(results)} trials finished, "
            f"{len(feasible)} meet the constraints."
        )
        return Selection(None, front, feasible, reason)
    best = max(scored, key=lambda item: (item[0], item[1].speedup or 0.0, _neg_id(item[1].id)))[1]
    return Selection(best, front, feasible, f"best by {rule_text}: trial {best.id}")


def _neg_id(ident: str) -> tuple[int, ...]:
    """Order key that prefers the smaller id under ``max``."""
    return tuple(-ord(c) for c in ident)
