"""Goals in Olive's plain vocabulary, judged per candidate; they decide the exit status.

| goal | value | measured | passes when |
|---|---|---|---|
| ``max-accuracy-drop`` | points (perplexity: percent) | task metric drop vs the reference | drop <= value |
| ``min-speedup`` | x | median per-pair speedup, worst shape | estimate >= value |
| ``max-fidelity-loss`` | 1 - cosine | 1 - mean cosine, worst output | loss <= value |
| ``max-regression`` | percent | latency vs the baseline report, per shape | CI low <= value |

The regression goal fails only when the whole bootstrap confidence interval lies above the
allowed regression, so noise alone does not fail a CI job; the speedup goal uses the point
estimate and reports its interval. Goals come from flags or YAML, either a list of
``{type: ..., value: ...}`` (Olive's form) or a mapping ``{max-accuracy-drop: 1, ...}``, optionally
under a top-level ``goals:`` key; underscores and dashes are interchangeable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from factorlm.bench.latency import regression_interval
from factorlm.errors import ConfigError

__all__ = [
    "GOAL_TYPES",
    "Goal",
    "GoalResult",
    "evaluate_goals",
    "goals_from_options",
    "load_goals",
    "parse_percent",
]

logger = logging.getLogger(__name__)

GOAL_TYPES = ("max-accuracy-drop", "min-speedup", "max-fidelity-loss", "max-regression")


@dataclass(frozen=True)
class Goal:
    """One criterion; ``value`` is in the unit of the table above."""

    type: str
    value: float

    def __post_init__(self) -> None:
        if self.type not in GOAL_TYPES:
            raise ConfigError(f"Goal type {self.type!r} is not one of {', '.join(GOAL_TYPES)}.")
        if not math.isfinite(self.value) or self.value < 0:
            raise ConfigError(f"Goal {self.type} needs a non-negative number, not {self.value}.")

    @property
    def label(self) -> str:
        unit = {
            "max-accuracy-drop": "",
            "min-speedup": "x",
            "max-fidelity-loss": "",
            "max-regression": "%",
        }
        return f"{self.type} {self.value:g}{unit[self.type]}"


@dataclass(frozen=True)
class GoalResult:
    """A goal judged for one candidate; ``margin`` > 0 means room to spare, < 0 how far it missed."""

    goal: Goal
    candidate: str
    passed: bool
    measured: float | None
    margin: float | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.goal.type,
            "value": self.goal.value,
            "candidate": self.candidate,
            "passed": self.passed,
            "measured": self.measured,
            "margin": self.margin,
            "detail": self.detail,
        }


def parse_percent(text: str | float) -> float:
    """``"5%"``, ``"5"`` or ``5`` -> 5.0 (percent)."""
    raw = str(text).strip().removesuffix("%").strip()
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"Regression limit {text!r} is not a percentage such as 5 or 5%."
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"Regression limit {text!r} must be a non-negative percentage.")
    return value


def goals_from_options(
    *,
    max_accuracy_drop: float | None = None,
    min_speedup: float | None = None,
    max_fidelity_loss: float | None = None,
    max_regression: float | str | None = None,
) -> list[Goal]:
    """Goals from CLI flags or keyword arguments; ``None`` means no such goal."""
    goals = []
    if max_accuracy_drop is not None:
        goals.append(Goal("max-accuracy-drop", float(max_accuracy_drop)))
    if min_speedup is not None:
        goals.append(Goal("min-speedup", float(min_speedup)))
    if max_fidelity_loss is not None:
        goals.append(Goal("max-fidelity-loss", float(max_fidelity_loss)))
    if max_regression is not None:
        goals.append(Goal("max-regression", parse_percent(max_regression)))
    return goals


def load_goals(source: Path | Mapping[str, Any] | list[Any]) -> list[Goal]:
    """Goals from a YAML file or an already parsed mapping/list (see the module docstring)."""
    where = str(source) if isinstance(source, Path) else "goals"
    data: Any = source
    if isinstance(source, Path):
        if not source.is_file():
            raise ConfigError(f"Goals file {source} does not exist.")
        try:
            data = yaml.safe_load(source.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            raise ConfigError(f"Goals file {source} is not valid YAML.") from None
    if isinstance(data, Mapping) and "goals" in data:
        data = data["goals"]
    items: list[tuple[Any, Any]] = []
    if isinstance(data, Mapping):
        items = list(data.items())
    elif isinstance(data, list):
        for entry in data:
            if not isinstance(entry, Mapping) or "type" not in entry or "value" not in entry:
                raise ConfigError(f"{where}: each goal needs 'type' and 'value', got {entry!r}.")
            items.append((entry["type"], entry["value"]))
    elif data is not None:
        raise ConfigError(f"{where}: goals must be a list or a mapping.")
    goals = []
    for key, value in items:
        kind = str(key).replace("_", "-").strip()
        if value is None:
            continue
        if kind == "max-regression":
            goals.append(Goal(kind, parse_percent(value)))
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: goal {kind} needs a number, not {value!r}.") from None
        goals.append(Goal(kind, number))
    return goals


def evaluate_goals(
    goals: list[Goal],
    report: Mapping[str, Any],
    *,
    baseline: Mapping[str, Any] | None = None,
    regression_basis: str = "reference",
    rng: np.random.Generator | None = None,
) -> list[GoalResult]:
    """Judge every goal for every candidate of a report dict (see ``factorlm.bench.report``)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    results: list[GoalResult] = []
    for cand in report["candidates"]:
        name = cand["name"]
        for goal in goals:
            if goal.type == "min-speedup":
                results.append(_speedup(goal, name, report))
            elif goal.type == "max-accuracy-drop":
                results.append(_accuracy(goal, name, report))
            elif goal.type == "max-fidelity-loss":
                results.append(_fidelity(goal, name, report))
            else:
                if baseline is None:
                    raise ConfigError("Goal max-regression needs a baseline report (--baseline).")
                results.append(_regression(goal, name, report, baseline, regression_basis, rng))
    for r in results:
        log = logger.info if r.passed else logger.warning
        log("%s %s: %s", r.candidate, r.goal.label, r.detail)
    return results


def _speedup(goal: Goal, name: str, report: Mapping[str, Any]) -> GoalResult:
    parts, worst = [], math.inf
    for entry in report["latency"]:
        s = entry["speedup"][name]
        worst = min(worst, s["estimate"])
        parts.append(
            f"{entry['shape']}: {s['estimate']:.3f}x [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
        )
    passed = worst >= goal.value
    verdict = "meets" if passed else "misses"
    detail = f"speedup {worst:.3f}x {verdict} the minimum {goal.value:g}x ({'; '.join(parts)})"
    return GoalResult(goal, name, passed, worst, worst - goal.value, detail)


def _accuracy(goal: Goal, name: str, report: Mapping[str, Any]) -> GoalResult:
    task = report.get("task")
    if not task:
        raise ConfigError("Goal max-accuracy-drop needs labelled data (--data and --task).")
    drop = float(task["drop"][name])
    unit = "%" if task["drop_unit"] == "percent" else " points"
    passed = drop <= goal.value
    detail = (
        f"{task['metric']} {task['reference']:.4g} -> {task['candidates'][name]:.4g}: drop "
        f"{drop:.3f}{unit} {'within' if passed else 'exceeds'} the allowed {goal.value:g}{unit}"
    )
    return GoalResult(goal, name, passed, drop, goal.value - drop, detail)


def _fidelity(goal: Goal, name: str, report: Mapping[str, Any]) -> GoalResult:
    block = report["fidelity"][name]
    outputs = block["outputs"]
    worst_name, worst = None, -math.inf
    for output, metrics in outputs.items():
        if metrics.get("rows"):
            loss = 1.0 - float(metrics["cosine_mean"])
            if loss > worst:
                worst_name, worst = output, loss
    if worst_name is None:
        return GoalResult(goal, name, False, None, None, "no output could be compared")
    passed = worst <= goal.value
    detail = (
        f"1 - cosine on {worst_name} ({block['inputs']} inputs) is {worst:.4g}, "
        f"{'within' if passed else 'above'} the allowed {goal.value:g}"
    )
    return GoalResult(goal, name, passed, worst, goal.value - worst, detail)


def _baseline_candidate(baseline: Mapping[str, Any], name: str) -> str:
    names = [c["name"] for c in baseline.get("candidates", [])]
    if name in names:
        return name
    if len(names) == 1:
        logger.info("Baseline candidate %s stands in for %s", names[0], name)
        return names[0]
    raise ConfigError(
        f"Baseline report has no candidate named {name} (it has {', '.join(names) or 'none'})."
    )


def _regression(
    goal: Goal,
    name: str,
    report: Mapping[str, Any],
    baseline: Mapping[str, Any],
    basis: str,
    rng: np.random.Generator,
) -> GoalResult:
    base_name = _baseline_candidate(baseline, name)
    base_ref = baseline["reference"]["name"]
    base_shapes = {e["shape"]: e for e in baseline["latency"]}
    allowed = goal.value / 100.0
    parts, worst_low, worst_est, compared = [], -math.inf, -math.inf, 0
    failed = False
    for entry in report["latency"]:
        old = base_shapes.get(entry["shape"])
        if old is None:
            parts.append(f"{entry['shape']}: not in baseline")
            continue
        compared += 1
        current = (
            np.asarray(entry["results"][report["reference"]["name"]]["samples_ms"]),
            np.asarray(entry["results"][name]["samples_ms"]),
        )
        before = (
            np.asarray(old["results"][base_ref]["samples_ms"]),
            np.asarray(old["results"][base_name]["samples_ms"]),
        )
        interval = regression_interval(current, before, rng=rng, basis=basis)
        failed |= interval.low > allowed
        worst_low = max(worst_low, interval.low)
        worst_est = max(worst_est, interval.estimate)
        parts.append(
            f"{entry['shape']}: {interval.estimate * 100:+.1f}% "
            f"[{interval.low * 100:+.1f}%, {interval.high * 100:+.1f}%]"
        )
    if compared == 0:
        raise ConfigError(
            "Baseline report shares no shape with this run "
            f"(baseline: {', '.join(base_shapes) or 'none'})."
        )
    verdict = "exceeds" if failed else "within"
    detail = (
        f"latency change vs baseline ({basis} basis) {verdict} the allowed +{goal.value:g}% "
        f"({'; '.join(parts)})"
    )
    return GoalResult(
        goal, name, not failed, worst_est * 100.0, (allowed - worst_low) * 100.0, detail
    )
