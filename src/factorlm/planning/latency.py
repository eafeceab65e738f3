"""Ranks under a latency target: measured per-shape curves, interpolated, spent like a budget.

A low-rank pair ``x @ L @ R`` is faster than ``x @ W`` only below a rank that depends on the
shape, the engine, the precision and the token count, not on FLOPs alone, so the cost of every
candidate rank comes from measurement (``factorlm.costmodel`` times small ONNX graphs on the
engine). This module holds the pure part: a ``LatencyCurve`` per weight shape (a few measured
ranks, piecewise-linear in between), a ``LatencyModel`` (the curves plus the measured latency of
the whole dense model) and ``allocate_latency``, which picks per weight a rank or dense so that

    predicted = model_ms + Σ_w calls_w · (factored_w(r_w) − dense_w)   ≤ target_ms

while minimising the same summed (relative) truncation error as the parameter allocation
(``decompose.allocate_ranks``). Only differences to dense enter the prediction, so the fixed
overhead of running a small graph cancels. A rank whose factored pair is not faster than dense
is dominated (more latency and more error) and never chosen: such weights stay dense.

Every factorized form has its own curves (``CurveSpec``, keyed by ``CurveSpec.key``): the
low-rank pair, low-rank + sparse (per sparse structure and density), a joint Q/K/V group (one
shared left factor feeding one right factor per member; when the engine fuses Attention, the
concatenated pair) and each Kronecker split (over term counts instead of ranks).
``spend_latency`` is the allocation shared by every form: per weight a list of undominated
choices (``LatencyChoices``), dense last.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from factorlm.decompose import (
    DecompositionError,
    WeightSpectrum,
    break_even_rank,
    kronecker_cost,
    propose_kronecker_shapes,
    round_rank,
)
from factorlm.decompose.rank import DEFAULT_MIN_FRACTION, WeightOptions, allocate_options
from factorlm.errors import ConfigError
from factorlm.planning.schema import CandidateLike

__all__ = [
    "CURVE_FORMS",
    "CurveSpec",
    "LatencyAllocation",
    "LatencyChoices",
    "LatencyCurve",
    "LatencyModel",
    "allocate_latency",
    "candidate_spec",
    "choices_front",
    "joint_spec",
    "kron_spec",
    "kron_specs",
    "kron_term_limit",
    "losparse_spec",
    "lowrank_spec",
    "measured_ranks",
    "shape_key",
    "spend_latency",
]

logger = logging.getLogger(__name__)

#: Budget resolution of the exact knapsack: the dense weights' summed latency in this many units.
_RESOLUTION = 4000


def shape_key(shape: Sequence[int]) -> str:
    """``(384, 1536)`` -> ``"384x1536"`` (the key of a curve in a ``LatencyModel``)."""
    return f"{int(shape[0])}x{int(shape[1])}"


def measured_ranks(m: int, n: int, multiple: int, points: int = 7) -> list[int]:
    """The ranks to measure for an ``(m, n)`` weight: ~``points`` multiples up to break-even.

    Every rank the planner may choose (multiples of ``multiple`` up to the parameter break-even)
    lies between the first and the last, so interpolation never extrapolates.
    """
    top = (break_even_rank(m, n) // multiple) * multiple
    if top < multiple:
        return []
    grid = np.linspace(multiple, top, max(2, points))
    return sorted({round_rank(round(float(r) / multiple) * multiple, multiple) for r in grid})


CurveForm = Literal["lowrank", "losparse", "joint", "kron"]
CURVE_FORMS: tuple[str, ...] = ("lowrank", "losparse", "joint", "kron")
#: Term counts measured per Kronecker split: its cost is close to linear in the terms.
_KRON_POINTS = 4


@dataclass(frozen=True)
class CurveSpec:
    """What one latency curve times: a factorized form of one weight shape at a few ranks.

    ``ranks`` are ranks (``lowrank``, ``losparse``, ``joint``) or term counts (``kron``).
    ``widths``: a joint group's member output widths (``shape[1]`` is their sum); ``fused``: the
    engine runs the group as one fused Attention product. ``sparse``: (structure, density) of
    low-rank + sparse. ``kron``: the split ``(a_in, a_out, b_in, b_out)``.
    """

    form: CurveForm
    shape: tuple[int, int]
    ranks: tuple[int, ...]
    widths: tuple[int, ...] = ()
    fused: bool = False
    sparse: tuple[str, float] | None = None
    kron: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.form not in CURVE_FORMS:
            raise ConfigError(f"latency curve form {self.form!r} is unknown.")
        if self.form == "joint" and sum(self.widths) != self.shape[1]:
            raise ConfigError(
                f"joint latency curve {shape_key(self.shape)}: member widths {self.widths} "
                "must add up to its output width."
            )
        if self.form == "losparse" and self.sparse is None:
            raise ConfigError("a low-rank + sparse latency curve needs its sparse structure.")
        if self.form == "kron" and self.kron is None:
            raise ConfigError("a Kronecker latency curve needs its split.")

    @property
    def key(self) -> str:
        """The curve's name in a ``LatencyModel``: the shape, then the form's parameters."""
        base = shape_key(self.shape)
        if self.form == "losparse":
            assert self.sparse is not None
            return f"{base}/losparse-{self.sparse[0]}-{self.sparse[1]:g}"
        if self.form == "joint":
            fused = "fused-" if self.fused else ""
            return f"{base}/joint-{fused}{'+'.join(str(w) for w in self.widths)}"
        if self.form == "kron":
            assert self.kron is not None
            return f"{base}/kron-{'x'.join(str(d) for d in self.kron)}"
        return base

    def to_record(self) -> dict[str, Any]:
        """The fields that change what is timed (a cache key's part)."""
        return {
            "form": self.form,
            "shape": list(self.shape),
            "ranks": list(self.ranks),
            "widths": list(self.widths),
            "fused": self.fused,
            "sparse": list(self.sparse) if self.sparse is not None else None,
            "kron": list(self.kron) if self.kron is not None else None,
        }


def lowrank_spec(shape: Sequence[int], multiple: int) -> CurveSpec | None:
    """The low-rank pair of an ``(m, n)`` weight (None when no rank of the grid pays)."""
    m, n = int(shape[0]), int(shape[1])
    ranks = measured_ranks(m, n, multiple)
    return CurveSpec("lowrank", (m, n), tuple(ranks)) if ranks else None


def losparse_spec(
    shape: Sequence[int], multiple: int, structure: str, density: float
) -> CurveSpec | None:
    """Low-rank + sparse (``structure`` at ``density``) at the low-rank grid's ranks."""
    found = lowrank_spec(shape, multiple)
    if found is None:
        return None
    return replace(found, form="losparse", sparse=(str(structure), float(density)))


def joint_spec(
    shape: Sequence[int], widths: Sequence[int], multiple: int, *, fused: bool = False
) -> CurveSpec | None:
    """A joint Q/K/V group: ``x @ L`` once, then one ``@ R_j`` per member of ``widths``.

    ``fused``: the engine runs the group inside one Attention node, whose product is the
    concatenated pair, so the curve is that of the low-rank ``(m, Σ widths)`` pair. Without
    member widths (unknown) the group is timed as that concatenated pair too.
    """
    found = lowrank_spec(shape, multiple)
    if found is None or fused or len(widths) < 2:
        return found
    return replace(found, form="joint", widths=tuple(int(w) for w in widths))


def kron_term_limit(shape: Sequence[int], a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    """The most terms of a split below dense in parameters and not above it in FLOPs."""
    m, n = int(shape[0]), int(shape[1])
    per_params, per_flops = kronecker_cost(
        (int(a_shape[0]), int(a_shape[1])), (int(b_shape[0]), int(b_shape[1])), 1
    )
    return min(
        int(a_shape[0]) * int(a_shape[1]),
        int(b_shape[0]) * int(b_shape[1]),
        (2 * m * n) // per_flops,
        (m * n - 1) // per_params,
    )


def kron_spec(
    shape: Sequence[int], a_shape: Sequence[int], b_shape: Sequence[int], most: int
) -> CurveSpec:
    """One Kronecker split, timed at ~4 term counts from 1 to ``most``."""
    grid = np.linspace(1, most, min(_KRON_POINTS, most))
    terms = tuple(sorted({round(float(t)) for t in grid}))
    split = (int(a_shape[0]), int(a_shape[1]), int(b_shape[0]), int(b_shape[1]))
    return CurveSpec("kron", (int(shape[0]), int(shape[1])), terms, kron=split)


def kron_specs(shape: Sequence[int], limit: int) -> list[CurveSpec]:
    """The ``limit`` FLOP-cheapest Kronecker splits of a shape that pay at one term at least.

    The same splits ``planning.kronecker`` examines (``propose_kronecker_shapes(by="flops")``).
    """
    m, n = int(shape[0]), int(shape[1])
    found = []
    for a_shape, b_shape in propose_kronecker_shapes(m, n, limit=limit, by="flops"):
        most = kron_term_limit((m, n), a_shape, b_shape)
        if most >= 1:
            found.append(kron_spec((m, n), a_shape, b_shape, most))
    return found


def candidate_spec(
    cand: CandidateLike,
    method: str,
    multiple: int,
    *,
    sparse: tuple[str, float] = ("column", 0.05),
    fused: bool = False,
) -> CurveSpec | None:
    """The curve a low-rank-family plan of ``cand`` is predicted by (None: no rank pays).

    ``losparse`` weights: low-rank + ``sparse``; a joint Q/K/V candidate: the joint form of its
    members' widths (``fused``: the engine's fused Attention runs it as one pair); any other
    weight: the low-rank pair of its shape. Kronecker plans use ``kron_specs``.
    """
    if method == "losparse":
        return losparse_spec(cand.shape, multiple, *sparse)
    if cand.members:
        widths = tuple(getattr(cand, "member_widths", ()))
        return joint_spec(cand.shape, widths, multiple, fused=fused)
    return lowrank_spec(cand.shape, multiple)


@dataclass(frozen=True)
class LatencyCurve:
    """Measured milliseconds of one weight shape: dense, and factored at a few ranks."""

    shape: tuple[int, int]
    dense_ms: float
    ranks: tuple[int, ...]
    factored_ms: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.ranks) != len(self.factored_ms) or not self.ranks:
            raise ConfigError(f"latency curve {shape_key(self.shape)} needs one time per rank.")
        if any(b <= a for a, b in zip(self.ranks, self.ranks[1:], strict=False)):
            raise ConfigError(f"latency curve {shape_key(self.shape)}: ranks must ascend.")

    def at(self, rank: int) -> float:
        """Factored milliseconds at ``rank``: exact at measured ranks, linear in between.

        Outside the measured range the nearest segment is extended (planning queries stay
        inside it; see ``measured_ranks``).
        """
        ranks = np.asarray(self.ranks, dtype=np.float64)
        times = np.asarray(self.factored_ms, dtype=np.float64)
        if ranks.size == 1:
            return float(times[0])
        if rank <= ranks[0] or rank >= ranks[-1]:
            i = 0 if rank <= ranks[0] else ranks.size - 2
            slope = (times[i + 1] - times[i]) / (ranks[i + 1] - ranks[i])
            return float(times[i] + slope * (rank - ranks[i]))
        return float(np.interp(rank, ranks, times))

    def scaled(self, alpha: float) -> LatencyCurve:
        """The curve whose savings over dense are ``alpha`` times these (dense unchanged).

        A time is never below 0 (an α > 1 on a rank far below dense would go there).
        """
        return replace(
            self,
            factored_ms=tuple(
                max(0.0, self.dense_ms + alpha * (f - self.dense_ms)) for f in self.factored_ms
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dense_ms": self.dense_ms,
            "ranks": list(self.ranks),
            "factored_ms": list(self.factored_ms),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyCurve:
        shape = data["shape"]
        return cls(
            shape=(int(shape[0]), int(shape[1])),
            dense_ms=float(data["dense_ms"]),
            ranks=tuple(int(r) for r in data["ranks"]),
            factored_ms=tuple(float(t) for t in data["factored_ms"]),
        )


@dataclass(frozen=True)
class LatencyModel:
    """The curves of every weight shape and the measured latency of the whole dense model.

    ``savings_scale`` (α) maps a curve's saving to the whole engine's: a weight factored at
    rank r saves ``α · (dense − factored(r))`` there. Timed alone, a small graph keeps its
    weight in cache; inside a model every weight is read cold, so at one token row (1x128)
    the engine saved ~1.11x what the curves said and at 8x128 ~0.9x (issue 17's recorded
    runs: the constant α fitted every target within 2 %). ``costmodel`` measures α on one
    factorized probe of the model (1.0: not calibrated). ``curve`` returns the scaled curve,
    so every form's planning and prediction use it.
    """

    model_ms: float
    curves: Mapping[str, LatencyCurve]
    config: Mapping[str, Any] = field(default_factory=dict)
    savings_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.savings_scale) and self.savings_scale > 0):
            raise ConfigError(f"latency savings scale {self.savings_scale!r} must be positive.")

    def curve(self, shape: Sequence[int] | CurveSpec) -> LatencyCurve | None:
        """The curve of a low-rank ``shape``, or of any form's ``CurveSpec`` (α applied)."""
        found = self.raw_curve(shape)
        if found is None or self.savings_scale == 1.0:
            return found
        return found.scaled(self.savings_scale)

    def raw_curve(self, shape: Sequence[int] | CurveSpec) -> LatencyCurve | None:
        """The curve as measured on small graphs, without ``savings_scale``."""
        key = shape.key if isinstance(shape, CurveSpec) else shape_key(shape)
        return self.curves.get(key)

    @property
    def attention_fused(self) -> bool:
        """Whether the engine runs Q/K/V inside fused Attention (joint groups' curve form)."""
        return bool(self.config.get("attention_fused", False))


@dataclass(frozen=True)
class LatencyAllocation:
    """Chosen ranks (None = dense) and the predicted milliseconds, per weight and in total.

    ``ranks`` holds each weight's choice: a rank for the low-rank forms, the form's own
    description for others (a Kronecker split and term count); None = dense.
    """

    ranks: dict[str, Any]
    weight_ms: dict[str, float]  # predicted ms of each weight as chosen (dense or factored)
    dense_ms: dict[str, float]  # measured ms of each weight left dense
    predicted_ms: float
    model_ms: float
    target_ms: float

    @property
    def predicted_speedup(self) -> float:
        return self.model_ms / self.predicted_ms if self.predicted_ms > 0 else float("inf")


@dataclass(frozen=True)
class LatencyChoices:
    """One weight's undominated choices, cheapest first, dense (None) last at error 0."""

    choices: list[Any]
    ms: list[float]
    errors: list[float]


def choices_front(found: Iterable[tuple[Any, float, float]], dense_ms: float) -> LatencyChoices:
    """The (choice, ms, error) options faster than dense that each remove error cheaper ones keep.

    A choice at least as slow as dense, or no more accurate than a faster one, is dominated and
    dropped; dense closes the list at error 0.
    """
    choices: list[Any] = []
    costs: list[float] = []
    errors: list[float] = []
    best = math.inf
    for choice, ms, err in sorted(found, key=lambda t: (t[1], t[2])):
        if ms < dense_ms and err < best:
            choices.append(choice)
            costs.append(ms)
            errors.append(err)
            best = err
    return LatencyChoices([*choices, None], [*costs, dense_ms], [*errors, 0.0])


def _options(
    spec: WeightSpectrum,
    curve: LatencyCurve,
    calls: int,
    multiple: int,
    min_fraction: float,
    error: str,
) -> LatencyChoices:
    """Undominated (rank, ms, error) options of one weight, cheapest first, dense last."""
    m, n = spec.shape
    even = break_even_rank(m, n)
    low = round_rank(max(1, math.ceil(min_fraction * even)), multiple)
    s = np.sort(np.asarray(spec.singular_values, dtype=np.float64))[::-1]
    tail = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])
    if error == "relative" and tail[0] > 0:
        tail = tail / tail[0]
    found = [
        (r, calls * curve.at(r), float(tail[min(r, tail.size - 1)]))
        for r in range(low, even + 1, multiple)
    ]
    return choices_front(found, calls * curve.dense_ms)


def spend_latency(
    options_at: Callable[[float], Mapping[str, LatencyChoices]],
    *,
    model_ms: float,
    target_ms: float,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    missing: Sequence[str] = (),
) -> LatencyAllocation:
    """One choice per weight minimising the summed error with predicted latency ≤ ``target_ms``.

    ``options_at(floor)`` gives every planned weight's choices with the smallest factorization
    at ``floor`` (a fraction of its break-even: the min-fraction preference, dropped as far as
    needed when the target cannot be met with it). Predicted = ``model_ms`` + Σ (chosen − dense).
    The knapsack is exact on a grid of ``1/4000`` of the dense weights' latency, costs rounded
    up and the budget down, so the prediction never exceeds the target. ``missing`` weights
    (no curve) stay dense. Raises ``ConfigError`` naming the fastest predicted latency when the
    target is out of reach.
    """
    if not (math.isfinite(target_ms) and target_ms > 0):
        raise ConfigError(f"target latency {target_ms!r} ms must be a positive number.")
    options = dict(options_at(float(min_fraction)))
    dense_ms = {name: o.ms[-1] for name, o in options.items()}
    rest = model_ms - sum(dense_ms.values())
    budget = target_ms - rest

    def fastest(found: Mapping[str, LatencyChoices]) -> float:
        return rest + sum(o.ms[0] for o in found.values())

    floor = float(min_fraction)
    if fastest(options) > target_ms:
        lowest = fastest(options_at(0.0))
        if lowest > target_ms:
            raise ConfigError(
                f"target latency {target_ms:.3f} ms is out of reach: the fastest plan is predicted "
                f"at {lowest:.3f} ms ({model_ms / lowest:.2f}x of the dense "
                f"{model_ms:.3f} ms); lower the target speedup."
            )
        # The floor is a preference (as in allocate_ranks): the highest one that meets the target.
        low, high = 0.0, floor
        for _ in range(20):
            mid = 0.5 * (low + high)
            if fastest(options_at(mid)) <= target_ms:
                low = mid
            else:
                high = mid
        floor = low
        options = dict(options_at(floor))
        logger.info(
            "min_fraction %.3g lowered to %.3g to meet %.3f ms", min_fraction, floor, target_ms
        )
    choice: dict[str, int] = {}
    total_dense = sum(dense_ms.values())
    if options and total_dense > 0:
        unit = total_dense / _RESOLUTION
        cap = math.floor(budget / unit + 1e-9)
        weights: list[WeightOptions] = []
        for name, found in list(options.items()):
            units = [math.ceil(c / unit - 1e-9) for c in found.ms]
            keep = [i for i in range(len(units)) if i + 1 == len(units) or units[i] < units[i + 1]]
            weights.append(
                WeightOptions(
                    name,
                    np.asarray([units[i] for i in keep]),
                    np.asarray([found.errors[i] for i in keep]),
                )
            )
            options[name] = LatencyChoices(
                [found.choices[i] for i in keep],
                [found.ms[i] for i in keep],
                [found.errors[i] for i in keep],
            )
        original = sum(int(w.costs[-1]) for w in weights)
        try:
            choice = allocate_options(weights, ratio=max(cap, 0) / original if original else 1.0)
        except DecompositionError:
            # The rounding ate the slack: the fastest options alone meet the target.
            choice = dict.fromkeys(options, 0)
    ranks: dict[str, Any] = dict.fromkeys(missing)
    weight_ms: dict[str, float] = {}
    for name, found in options.items():
        index = choice.get(name, len(found.choices) - 1)
        ranks[name] = found.choices[index]
        weight_ms[name] = found.ms[index]
    predicted = rest + sum(weight_ms.values())
    logger.info(
        "latency plan: %.3f ms predicted (target %.3f, dense %.3f), %d of %d weights factorized",
        predicted,
        target_ms,
        model_ms,
        sum(r is not None for r in ranks.values()),
        len(ranks),
    )
    return LatencyAllocation(
        ranks=ranks,
        weight_ms=weight_ms,
        dense_ms=dense_ms,
        predicted_ms=predicted,
        model_ms=model_ms,
        target_ms=target_ms,
    )


def allocate_latency(
    spectra: Sequence[WeightSpectrum],
    model: LatencyModel,
    *,
    target_ms: float,
    calls: Mapping[str, int] | None = None,
    multiple: int = 8,
    error: str = "relative",
    min_fraction: float = DEFAULT_MIN_FRACTION,
    specs: Mapping[str, CurveSpec] | None = None,
) -> LatencyAllocation:
    """Ranks minimising the summed truncation error with predicted latency ≤ ``target_ms``.

    A weight whose curve is not in ``model`` stays dense (None); ``specs`` names the curve of a
    weight planned in another form than the low-rank pair of its shape (low-rank + sparse, a
    joint group). ``calls`` counts the products a weight runs per inference (default 1).
    ``min_fraction`` (of the parameter break-even rank) is a floor, dropped when the target
    cannot be met with it (``spend_latency``).
    """
    calls = calls or {}
    specs = specs or {}
    curves: dict[str, LatencyCurve] = {}
    for spec in spectra:
        curve = model.curve(specs.get(spec.name, spec.shape))
        if curve is not None:
            curves[spec.name] = curve
        else:  # too small for any rank of the grid: dense, its time inside the rest
            logger.info("no latency curve for %s %s: left dense", spec.name, spec.shape)
    missing = [s.name for s in spectra if s.name not in curves]
    planned = [s for s in spectra if s.name in curves]

    def options_at(floor: float) -> dict[str, LatencyChoices]:
        return {
            s.name: _options(s, curves[s.name], calls.get(s.name, 1), multiple, floor, error)
            for s in planned
        }

    return spend_latency(
        options_at,
        model_ms=model.model_ms,
        target_ms=target_ms,
        min_fraction=min_fraction,
        missing=missing,
    )
