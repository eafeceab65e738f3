"""The compression plan as data: which weight gets which factorization, and what it costs.

``make_plan`` is a pure function of the analysed weights, optional calibration statistics and a
budget. Its result is JSON keyed by initializer name that a user can read, edit (a rank, a method,
Kronecker shapes) and pass back with ``--plan``; ``validate_plan`` checks an edited plan against
the model and recomputes its costs. Numbers (spectra, global rank allocation, break-even) come
from ``factorlm.decompose``; this module only chooses and counts.

Costs follow docs/CONTRACTS.md: parameters stored, and FLOPs per token ``2·multiply-adds``. A
token embedding's Gather costs no FLOPs; factorized, its lookup adds the ``r × d`` MatMul.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from factorlm.decompose import (
    METHODS,
    DecompositionError,
    PreparedWeight,
    WeightOptions,
    WeightSpectrum,
    allocate_options,
    allocate_ranks,
    break_even_rank,
    kronecker_cost,
    kronecker_spectrum,
    prepare,
    propose_kronecker_shapes,
    rank_for_energy,
    round_rank,
    spectrum,
)
from factorlm.decompose.rank import DEFAULT_MIN_FRACTION, STRATEGIES
from factorlm.errors import ConfigError, PlanError
from factorlm.passes.analysis import Analysis, Candidate
from factorlm.passes.kronecker import supports_kronecker
from factorlm.passes.lowrank_sparse import supports_lowrank_sparse

__all__ = [
    "ALL_METHODS",
    "DATA_AWARE",
    "PLAN_FORMAT",
    "Plan",
    "StatsLike",
    "WeightPlan",
    "make_plan",
    "validate_plan",
]

logger = logging.getLogger(__name__)

PLAN_FORMAT = "factorlm.plan/1"
ALL_METHODS: tuple[str, ...] = (*METHODS, "kron", "losparse")
#: Method -> the statistic it needs (CalibrationStats field).
DATA_AWARE: dict[str, str] = {
    "whiten": "gram",
    "drone": "gram",
    "asvd": "mean_abs",
    "fwsvd": "fisher",
}
SPARSE_STRUCTURES = ("column", "unstructured", "2:4")
#: Kronecker splits examined per weight: the ones with the fewest FLOPs per parameter.
KRON_SHAPES = 4


class StatsLike(Protocol):
    """What planning reads from ``factorlm.calibration.CalibrationStats``."""

    gram: dict[str, np.ndarray]
    mean_abs: dict[str, np.ndarray]
    fisher: dict[str, np.ndarray]


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
            "weights": {name: asdict(w) for name, w in self.weights.items()},
            "skipped": self.skipped,
            "dense": self.dense,
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "plan") -> Plan:
        """Parse a plan, raising PlanError that names the file and the bad entry."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(
                f"{source} is not valid JSON ({exc.msg} at line {exc.lineno})."
            ) from None
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
            try:
                weights[name] = WeightPlan(**entry)
            except TypeError:
                raise PlanError(
                    f"{source}: entry {name!r} lacks 'nodes', 'kind', 'shape', 'stored_shape' or 'method'."
                ) from None
        skipped = data.get("skipped") or {}
        dense_raw = data.get("dense") or {}
        if not isinstance(dense_raw, dict) or not all(
            isinstance(v, dict) for v in dense_raw.values()
        ):
            raise PlanError(f"{source}: 'dense' must map weight names to {{'params', 'flops'}}.")
        return cls(
            method=str(data.get("method", "svd")),
            budget=dict(data.get("budget") or {}),
            weights=weights,
            skipped={str(k): str(v) for k, v in skipped.items()},
            dense={str(k): {kk: int(vv) for kk, vv in v.items()} for k, v in dense_raw.items()},
        )


def _costs(cand: Candidate, entry: WeightPlan) -> None:
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
    entry.flops_after = 2 * r * (m + n) * linear_uses + 2 * r * n * gathers
    if entry.method == "losparse" and entry.sparse is not None:
        structure, density = entry.sparse["structure"], float(entry.sparse["density"])
        if structure == "column":
            k = round(density * m)
            entry.params_after += k * n
            entry.flops_after += 2 * k * n
        else:  # stored and executed as a dense residual matrix
            entry.params_after += m * n
            entry.flops_after += 2 * m * n


def _dense_cost(cand: Candidate) -> dict[str, int]:
    """Parameters and FLOPs per token of a targeted weight that stays dense."""
    entry = WeightPlan(
        nodes=[], kind=cand.kind, shape=list(cand.shape), stored_shape=[], method="svd", rank=0
    )
    _costs(cand, entry)
    return {"params": entry.params_before, "flops": entry.flops_before}


def _relative_error(s: np.ndarray, rank: int) -> float:
    power = s.astype(np.float64) ** 2
    total = float(power.sum())
    return math.sqrt(float(power[rank:].sum()) / total) if total > 0 else 0.0


def _matches(pattern: re.Pattern[str], name: str, nodes: Sequence[str]) -> bool:
    return bool(pattern.search(name)) or any(pattern.search(node) for node in nodes)


def _compile(pattern: str | None, option: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"{option} pattern {pattern!r} is not a valid regular expression ({exc})."
        ) from None


def _stat(stats: StatsLike | None, method: str, name: str) -> dict[str, np.ndarray | None]:
    """The statistic a data-aware method needs for one weight, as decompose keyword arguments."""
    found: dict[str, np.ndarray | None] = {"gram": None, "mean_abs": None, "fisher": None}
    key = DATA_AWARE.get(method)
    if key is None:
        return found
    if stats is None:
        raise ConfigError(
            f"method {method!r} needs calibration statistics ({key}): pass --calib DATA (with "
            "--tokenizer) or --stats STATS.npz."
        )
    table: Mapping[str, np.ndarray] = getattr(stats, key)
    if name not in table:
        raise PlanError(f"the calibration statistics have no {key} for weight {name!r}.")
    found[key] = table[name]
    return found


def make_plan(
    analysis: Analysis,
    *,
    method: str = "svd",
    ratio: float = 0.5,
    energy: float | None = None,
    rank_multiple: int = 8,
    include: str | None = None,
    exclude: str | None = None,
    embeddings: float | None = None,
    stats: StatsLike | None = None,
    sparse_structure: str = "column",
    sparse_density: float = 0.05,
    allocation: str = "optimal",
    error_scale: str = "relative",
    min_fraction: float = DEFAULT_MIN_FRACTION,
    prepared: dict[str, PreparedWeight] | None = None,
) -> Plan:
    """Choose a factorization for every analysed weight under one budget.

    ``ratio`` is the fraction of the targeted linear weights' parameters that remains, spent
    globally by ``allocate_ranks`` over the (data-aware when ``stats``) spectra; ``energy``
    instead keeps that fraction of each weight's spectral energy. ``embeddings`` is the ratio for
    token embeddings (None leaves them dense). Weights whose best rank would not reduce their cost
    stay dense, with the reason in ``Plan.skipped``.

    ``allocation``, ``error_scale`` and ``min_fraction`` choose how ``allocate_ranks`` spends the
    budget (default: the exact optimum of the summed relative errors with no factorized weight
    below half its break-even rank; see benchmarks/results/allocation.md). Spectra are the
    eigenvalues of each weight's small-side Gram (``decompose.prepare``, no SVD); when
    ``prepared`` is a dict, the prepared weights of the factorized entries are stored in it so
    that ``compress`` builds their factors from one ``eigh`` of the same Gram.

    ``method="kron"`` spends the same budget on sums of Kronecker products whose FLOPs per token
    never exceed the dense weight's (``_plan_kronecker``): a Kronecker form's FLOPs, as a
    fraction of dense, are at least twice its parameters' fraction, so kron plans cost about as
    many FLOPs as dense at ratios above 0.5 and fewer below. ``allocation`` "lagrangian" is
    honoured there; every other strategy uses the exact knapsack.
    """
    if method not in ALL_METHODS:
        raise ConfigError(f"method {method!r} is unknown; use one of {', '.join(ALL_METHODS)}.")
    if not (isinstance(ratio, int | float) and 0.0 < ratio < 1.0):
        raise ConfigError(f"ratio {ratio!r} is out of range: it must be strictly between 0 and 1.")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ConfigError(f"energy {energy!r} is out of range: it must be in (0, 1].")
    if embeddings is not None and not 0.0 < embeddings < 1.0:
        raise ConfigError(f"embeddings ratio {embeddings!r} is out of range: it must be in (0, 1).")
    if rank_multiple < 1:
        raise ConfigError(f"rank multiple {rank_multiple!r} must be a positive integer.")
    if allocation not in STRATEGIES:
        raise ConfigError(
            f"allocation {allocation!r} is unknown; use one of {', '.join(STRATEGIES)}."
        )
    if error_scale not in ("relative", "absolute"):
        raise ConfigError(f"error scale {error_scale!r} is unknown; use 'relative' or 'absolute'.")
    if not 0.0 <= min_fraction <= 1.0:
        raise ConfigError(f"min fraction {min_fraction!r} is out of range: it must be in [0, 1].")
    if method == "losparse":
        if sparse_structure not in SPARSE_STRUCTURES:
            raise ConfigError(
                f"sparse structure {sparse_structure!r} is unknown; use one of {', '.join(SPARSE_STRUCTURES)}."
            )
        if not 0.0 <= sparse_density < ratio:
            raise ConfigError(f"sparse density {sparse_density!r} must be in [0, ratio {ratio}).")
    if method in DATA_AWARE and stats is None:
        _stat(None, method, "")
    inc, exc = _compile(include, "--include"), _compile(exclude, "--exclude")
    if inc is not None:
        names = [(c.name, c.node_names) for c in analysis.candidates]
        names += [(s.name, list(s.nodes)) for s in analysis.skipped]
        if not any(_matches(inc, n, nodes) for n, nodes in names):
            raise ConfigError(
                f"--include pattern {include!r} matches no weight or node of the model."
            )

    plan = Plan(
        method=method,
        budget={
            "ratio": ratio,
            "energy": energy,
            "rank_multiple": rank_multiple,
            "embeddings": embeddings,
            "allocation": allocation,
            "error_scale": error_scale,
            "min_fraction": min_fraction,
            "include": include,
            "exclude": exclude,
            **(
                {"sparse_structure": sparse_structure, "sparse_density": sparse_density}
                if method == "losparse"
                else {}
            ),
        },
        skipped={s.name: s.reason for s in analysis.skipped},
    )
    linear: list[Candidate] = []
    for cand in analysis.candidates:
        if inc is not None and not _matches(inc, cand.name, cand.node_names):
            plan.skipped[cand.name] = f"not matched by --include {include!r}"
        elif exc is not None and _matches(exc, cand.name, cand.node_names):
            plan.skipped[cand.name] = f"excluded by --exclude {exclude!r}"
        elif cand.kind == "embedding":
            _plan_embedding(plan, cand, embeddings, rank_multiple)
        else:
            linear.append(cand)
    if method == "kron":
        _plan_kronecker(plan, linear, ratio, (allocation, error_scale, min_fraction))
    else:
        _plan_low_rank(
            plan,
            linear,
            method,
            ratio,
            energy,
            rank_multiple,
            stats,
            sparse_structure,
            sparse_density,
            (allocation, error_scale, min_fraction),
            prepared,
        )
    logger.info("Planned %d weights, %d left dense", len(plan.weights), len(plan.skipped))
    return plan


def _entry(cand: Candidate, method: str, **fields: Any) -> WeightPlan:
    return WeightPlan(
        nodes=cand.node_names,
        kind=cand.kind,
        shape=list(cand.shape),
        stored_shape=list(cand.stored_shape),
        method=method,
        **fields,
    )


def _plan_embedding(plan: Plan, cand: Candidate, ratio: float | None, multiple: int) -> None:
    if ratio is None:
        plan.skipped[cand.name] = (
            "token embedding left dense (set --embeddings RATIO to factorize it)"
        )
        return
    m, n = cand.shape
    limit = break_even_rank(m, n)
    rank = (int(ratio * m * n / (m + n)) // multiple) * multiple
    if rank < 1 or rank > limit:
        plan.skipped[cand.name] = (
            f"no rank multiple of {multiple} below break-even {limit} fits ratio {ratio}"
        )
        return
    s = spectrum(cand.matrix(), "svd")
    entry = _entry(cand, "svd", rank=rank, expected_error=_relative_error(s, rank))
    _costs(cand, entry)
    plan.weights[cand.name] = entry


@dataclass(frozen=True)
class _KronOption:
    params: int
    flops: int
    tail: float  # squared Frobenius error Σ s[t:]² of the Kronecker spectrum
    kron: dict[str, Any]


@dataclass(frozen=True)
class _KronSplit:
    """One factor shape of a weight: per-term costs, its FLOP break-even and its spectrum tail."""

    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    per_params: int
    per_flops: int
    most: int  # the most terms below dense in parameters and not above dense in FLOPs
    tail: np.ndarray  # tail[t] = Σ s[t:]²


def _kron_splits(cand: Candidate) -> list[_KronSplit]:
    """The ``KRON_SHAPES`` splits with the fewest FLOPs per parameter that beat dense at all.

    For every split FLOPs are at least the parameters (``decompose.kronecker``), so these are
    the shapes that store the most for what they compute.
    """
    m, n = cand.shape
    matrix = cand.matrix()
    found: list[_KronSplit] = []
    for a_shape, b_shape in propose_kronecker_shapes(m, n, limit=KRON_SHAPES, by="flops"):
        per_params, per_flops = kronecker_cost(a_shape, b_shape, 1)
        most = min(
            a_shape[0] * a_shape[1],
            b_shape[0] * b_shape[1],
            (2 * m * n) // per_flops,
            (m * n - 1) // per_params,
        )
        if most < 1:
            continue
        power = kronecker_spectrum(matrix, a_shape) ** 2
        tail = np.concatenate([np.cumsum(power[::-1])[::-1], [0.0]])
        found.append(_KronSplit(a_shape, b_shape, per_params, per_flops, most, tail))
    return found


def _kron_front(splits: list[_KronSplit], min_fraction: float) -> list[_KronOption]:
    """Term counts from ``min_fraction`` of each split's break-even up to it, on the front.

    Among forms of equal parameters the lower error wins, then the lower FLOPs; a form is kept
    only when it removes error that every cheaper form leaves.
    """
    found: list[_KronOption] = []
    for split in splits:
        low = max(1, math.ceil(min_fraction * split.most))
        for t in range(low, split.most + 1):
            kron = {"a_shape": list(split.a_shape), "b_shape": list(split.b_shape), "terms": t}
            tail = float(split.tail[min(t, split.tail.size - 1)])
            found.append(_KronOption(t * split.per_params, t * split.per_flops, tail, kron))
    found.sort(key=lambda o: (o.params, o.tail, o.flops))
    front: list[_KronOption] = []
    for option in found:
        if front and (option.params == front[-1].params or option.tail >= front[-1].tail):
            continue
        front.append(option)
    return front


def _plan_kronecker(
    plan: Plan,
    linear: list[Candidate],
    ratio: float,
    options: tuple[str, str, float] = ("optimal", "relative", DEFAULT_MIN_FRACTION),
) -> None:
    """Sums of Kronecker products under one parameter budget, never above dense FLOPs.

    A weight's options are dense and, for each of its FLOP-cheapest splits (``_kron_splits``),
    every term count from ``min_fraction`` of the split's FLOP break-even (the most terms whose
    FLOPs do not exceed dense) up to it: the analogue of the low-rank floor at a fraction of the
    break-even rank, lowered as far as needed when the ratio cannot be met with it. The
    low-rank allocation's multiple-choice knapsack picks one option per weight, minimising the
    summed (relative) squared error within ``ratio`` of the targeted parameters.
    """
    allocation, error_scale, min_fraction = options
    splits: dict[str, list[_KronSplit]] = {}
    scales: dict[str, float] = {}
    energy: dict[str, float] = {}
    for cand in linear:
        reason = supports_kronecker(cand)
        if reason is None and cand.members:
            reason = "a joint Q/K/V weight takes low-rank factors only, not Kronecker ones"
        if reason is not None:
            plan.skipped[cand.name] = reason
            continue
        splits[cand.name] = _kron_splits(cand)
        total = float(np.sum(cand.matrix().astype(np.float64) ** 2))
        energy[cand.name] = total
        scales[cand.name] = 1.0 / total if error_scale == "relative" and total > 0 else 1.0
    targets = [c for c in linear if c.name in splits]
    if not targets:
        return

    def fronts(fraction: float) -> dict[str, list[_KronOption]]:
        return {name: _kron_front(found, fraction) for name, found in splits.items()}

    def floor_cost(found: dict[str, list[_KronOption]]) -> int:
        return sum(
            found[c.name][0].params if found[c.name] else c.shape[0] * c.shape[1] for c in targets
        )

    dense_total = sum(c.shape[0] * c.shape[1] for c in targets)
    chosen = fronts(min_fraction)
    if floor_cost(chosen) > ratio * dense_total and min_fraction > 0:
        low, high = 0.0, float(min_fraction)
        for _ in range(20):
            mid = 0.5 * (low + high)
            if floor_cost(fronts(mid)) <= ratio * dense_total:
                low = mid
            else:
                high = mid
        logger.info(
            "kron: min_fraction %.3g infeasible at ratio %s; lowered to %.3g",
            min_fraction,
            ratio,
            low,
        )
        chosen = fronts(low)
    weights = [
        WeightOptions(
            c.name,
            np.asarray([o.params for o in chosen[c.name]] + [c.shape[0] * c.shape[1]], np.int64),
            np.asarray([o.tail * scales[c.name] for o in chosen[c.name]] + [0.0]),
        )
        for c in targets
    ]
    try:
        picked = allocate_options(
            weights, ratio=ratio, strategy="lagrangian" if allocation == "lagrangian" else "optimal"
        )
    except DecompositionError as exc:
        raise ConfigError(f"method 'kron': {exc}") from None
    for cand in targets:
        found, index = chosen[cand.name], picked[cand.name]
        if index >= len(found):
            plan.dense[cand.name] = _dense_cost(cand)
            m, n = cand.shape
            plan.skipped[cand.name] = (
                "left dense by the global Kronecker allocation (cutting it costs the most error)"
                if found
                else f"no Kronecker split of {m}x{n} is cheaper than dense in parameters and FLOPs"
            )
            continue
        option = found[index]
        total = energy[cand.name]
        error = math.sqrt(option.tail / total) if total > 0 else 0.0
        entry = _entry(cand, "kron", kron=dict(option.kron), expected_error=error)
        _costs(cand, entry)
        plan.weights[cand.name] = entry


def _plan_low_rank(
    plan: Plan,
    linear: list[Candidate],
    method: str,
    ratio: float,
    energy: float | None,
    multiple: int,
    stats: StatsLike | None,
    structure: str,
    density: float,
    options: tuple[str, str, float] = ("optimal", "relative", DEFAULT_MIN_FRACTION),
    prepared: dict[str, PreparedWeight] | None = None,
) -> None:
    core_method = "svd" if method == "losparse" else method
    targets: list[Candidate] = []
    for cand in linear:
        reason = supports_lowrank_sparse(cand) if method == "losparse" else None
        if reason is None and method == "losparse" and cand.members:
            reason = "a joint Q/K/V weight takes plain low-rank factors only, not low-rank + sparse"
        if reason is not None:
            plan.skipped[cand.name] = reason
        else:
            targets.append(cand)
    spectra: dict[str, np.ndarray] = {}
    cache: dict[str, PreparedWeight] = {}
    for cand in targets:
        found = _stat(stats, core_method, cand.name)
        # Eigenvalues of the small-side Gram only; compress takes the vectors (one eigh) for
        # the weights the allocation factorizes, so no vectors are held in between.
        ready = prepare(
            cand.matrix(),
            core_method,
            gram=found["gram"],
            mean_abs=found["mean_abs"],
            fisher=found["fisher"],
            keep=0,
        )
        spectra[cand.name] = ready.singular_values
        if prepared is not None and method != "losparse":
            cache[cand.name] = ready
    if energy is not None:
        ranks: dict[str, int | None] = {}
        for cand in targets:
            m, n = cand.shape
            r = round_rank(rank_for_energy(spectra[cand.name], energy), multiple)
            ranks[cand.name] = r if r <= break_even_rank(m, n) else None
    else:
        # losparse spends part of each weight's budget on the sparse part.
        lr_ratio = ratio - density if method == "losparse" else ratio
        ranks = (
            allocate_ranks(
                [WeightSpectrum(c.name, c.shape, spectra[c.name]) for c in targets],
                ratio=lr_ratio,
                multiple=multiple,
                strategy=options[0],  # type: ignore[arg-type]
                error=options[1],  # type: ignore[arg-type]
                min_fraction=options[2],
            )
            if targets
            else {}
        )
    for cand in targets:
        chosen = ranks.get(cand.name)
        m, n = cand.shape
        limit = break_even_rank(m, n)
        if chosen is None:
            plan.dense[cand.name] = _dense_cost(cand)
            if limit < multiple:
                plan.skipped[cand.name] = (
                    f"would not reduce cost: break-even rank {limit} is below the rank multiple {multiple}"
                )
            elif energy is not None:
                plan.skipped[cand.name] = (
                    f"would not reduce cost: energy {energy} needs a rank above break-even {limit}"
                )
            else:
                plan.skipped[cand.name] = (
                    "left dense by the global rank allocation (cutting it costs the most error)"
                )
            continue
        sparse = {"structure": structure, "density": density} if method == "losparse" else None
        entry = _entry(
            cand,
            method,
            rank=chosen,
            sparse=sparse,
            expected_error=_relative_error(spectra[cand.name], chosen),
        )
        _costs(cand, entry)
        plan.weights[cand.name] = entry
        if prepared is not None and cand.name in cache:
            prepared[cand.name] = cache.pop(cand.name)


def validate_plan(plan: Plan, analysis: Analysis) -> Plan:
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
        if cand.kind == "embedding" and entry.method != "svd":
            raise PlanError(
                f"plan weight {name!r} is a token embedding; only method 'svd' applies to it."
            )
        if cand.members and entry.method in ("kron", "losparse"):
            raise PlanError(
                f"plan weight {name!r} is a joint Q/K/V weight; method {entry.method!r} does not "
                "apply to it (use a low-rank method, or plan its members separately)."
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
        _costs(cand, entry)
    dense: dict[str, dict[str, int]] = {}
    for name in plan.dense:
        cand = analysis.candidate(name)
        if cand is not None and name not in plan.weights:
            dense[name] = _dense_cost(cand)
    plan.dense = dense
    return plan


def _validate_kron(name: str, entry: WeightPlan, cand: Candidate) -> None:
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
