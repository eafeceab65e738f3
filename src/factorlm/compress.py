"""``compress``: load, analyse, plan, factorize, rewrite and save, as one Python call.

The stages are kept apart so each can be checked on its own: ``passes.analyze`` finds the
weights, ``planning.make_plan`` (or a user's plan through ``planning.validate_plan``) decides
ranks, ``factorlm.decompose`` computes every number, the passes only rewire the graph, and
``io.save_model`` writes atomically after the full ONNX check. Nothing is written until every
user input has been validated, so a mistake leaves no output file behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from factorlm._callable import make_module_callable
from factorlm.decompose import PreparedWeight, kronecker, lowrank_plus_sparse, prepared_lowrank
from factorlm.errors import ConfigError, PlanError
from factorlm.io import load_model, save_model
from factorlm.passes import (
    JOINT_SEPARATOR,
    JointLinearPass,
    KroneckerPass,
    LowRankEmbeddingPass,
    LowRankLinearPass,
    LowRankSparsePass,
    RemoveReplacedWeightsPass,
    analyze,
    joint_statistics,
    member_names,
)
from factorlm.planning import DATA_AWARE, Plan, StatsLike, WeightPlan, make_plan, validate_plan

__all__ = [
    "DEFAULT_MIN_SIZE",
    "CompressResult",
    "compress",
    "factorize_entry",
    "plan_path_for",
    "write_text_atomic",
]

logger = logging.getLogger(__name__)

#: Matrices with fewer elements are not worth a factorization's extra node.
DEFAULT_MIN_SIZE = 4096


@dataclass
class CompressResult:
    """What ``compress`` did: the plan, counts, costs before/after and the files written."""

    plan: Plan
    factorized: int
    skipped: int
    params_before: int  # every targeted weight (factorized + left dense by the allocation)
    params_after: int
    flops_before: int
    flops_after: int
    model_params_before: int
    model_params_after: int
    output_paths: list[Path] = field(default_factory=list)
    plan_path: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def plan_path_for(output_path: Path) -> Path:
    """``OUT.onnx`` -> ``OUT.plan.json``."""
    stem = (
        output_path.name[: -len(".onnx")]
        if output_path.name.endswith(".onnx")
        else output_path.name
    )
    return output_path.with_name(f"{stem}.plan.json")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name in ``path``'s folder, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _model_params(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += int(np.prod(value.const_value.shape.numpy(), dtype=np.int64))
    return total


def _load_plan(plan: Plan | str | os.PathLike[str]) -> Plan:
    if isinstance(plan, Plan):
        return plan
    path = Path(plan)
    if not path.is_file():
        raise PlanError(f"plan file {path} does not exist.")
    return Plan.from_json(path.read_text(encoding="utf-8"), source=str(path))


def factorize_entry(
    name: str, entry: WeightPlan, matrix: np.ndarray, stats: StatsLike | None
) -> Any:
    """The numbers for one plan entry, all from factorlm.decompose (also used by recovery).

    Low-rank entries go through the planner's prepared path (``prepared_lowrank``: one ``eigh``
    of the small-side Gram), so replaying a saved plan gives the factors a plan-less ``compress``
    builds from the planner's own eigendecompositions.
    """
    if entry.method == "kron":
        assert entry.kron is not None
        a_in, a_out = (int(d) for d in entry.kron["a_shape"])
        return kronecker(matrix, (a_in, a_out), int(entry.kron["terms"]))
    assert entry.rank is not None
    if entry.method == "losparse":
        assert entry.sparse is not None
        return lowrank_plus_sparse(
            matrix, entry.rank, float(entry.sparse["density"]), entry.sparse["structure"]
        )
    key = DATA_AWARE.get(entry.method)
    extra: dict[str, np.ndarray | None] = {"gram": None, "mean_abs": None, "fisher": None}
    if key is not None:
        table = getattr(stats, key, None) if stats is not None else None
        if table is None or name not in table:
            raise ConfigError(
                f"plan weight {name!r} uses method {entry.method!r}, which needs calibration "
                f"statistics ({key}): pass --calib DATA or --stats STATS.npz."
            )
        extra[key] = table[name]
    return prepared_lowrank(
        matrix,
        entry.method,
        entry.rank,
        gram=extra["gram"],
        mean_abs=extra["mean_abs"],
        fisher=extra["fisher"],
    )


def compress(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    method: str = "svd",
    ratio: float = 0.5,
    energy: float | None = None,
    rank_multiple: int = 8,
    include: str | None = None,
    exclude: str | None = None,
    embeddings: float | None = None,
    plan: Plan | str | os.PathLike[str] | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    stats: StatsLike | None = None,
    external_data: bool | None = None,
    sparse_structure: str = "column",
    sparse_density: float = 0.05,
    joint_qkv: bool = False,
    allocation: str = "optimal",
    error_scale: str = "relative",
    min_fraction: float = 0.5,  # decompose.rank.DEFAULT_MIN_FRACTION
    progress: Callable[[str, int, int], None] | None = None,
) -> CompressResult:
    """Factorize the linear (and optionally embedding) weights of an ONNX model.

    Writes ``output_path`` (external data above 2 GB or when ``external_data``) and
    ``<output>.plan.json``. ``plan`` (a Plan or a JSON path) replaces the planner; it is validated
    against the model. ``progress(stage, done, total)`` is called while factorizing.
    ``allocation``, ``error_scale`` and ``min_fraction`` choose how the planner spreads the budget
    (``planning.make_plan``, ``decompose.rank.allocate_ranks``).
    ``joint_qkv`` plans linear weights that share an input (Q/K/V) as one joint weight with a
    shared down-projection, which keeps ONNX Runtime's Attention fusion (``passes.joint``).
    """
    source, target = Path(model_path), Path(output_path)
    if source.exists() and target.exists() and source.resolve() == target.resolve():
        raise ConfigError(f"output {target} is the input model; choose another output path.")
    if min_size < 0:
        raise ConfigError(f"min size {min_size} must be non-negative.")
    clock = time.perf_counter()
    seconds: dict[str, float] = {}
    model = load_model(source)
    loaded = _load_plan(plan) if plan is not None else None
    # A plan written with joint candidates ("<q>+<k>+<v>") needs the joint analysis to validate.
    # Kronecker and low-rank + sparse factors have no joint form: their members plan separately.
    if loaded is not None:
        joint = any(JOINT_SEPARATOR in name for name in loaded.weights)
    else:
        joint = joint_qkv and method not in ("kron", "losparse")
    analysis = analyze(model, min_size=min_size, joint=joint)
    stats = joint_statistics(stats, analysis)
    seconds["load"] = time.perf_counter() - clock
    # The planner's eigendecompositions, reused for the factors (one SVD per weight, not two).
    prepared: dict[str, PreparedWeight] = {}
    if loaded is not None:
        chosen = validate_plan(loaded, analysis)
    else:
        chosen = make_plan(
            analysis,
            method=method,
            ratio=ratio,
            energy=energy,
            rank_multiple=rank_multiple,
            include=include,
            exclude=exclude,
            embeddings=embeddings,
            stats=stats,
            sparse_structure=sparse_structure,
            sparse_density=sparse_density,
            allocation=allocation,
            error_scale=error_scale,
            min_fraction=min_fraction,
            prepared=prepared,
        )
    seconds["plan"] = time.perf_counter() - clock - seconds["load"]
    model_params_before = _model_params(model)

    groups: dict[str, dict[str, Any]] = {
        "linear": {},
        "embedding": {},
        "kron": {},
        "losparse": {},
        "joint": {},
    }
    total = len(chosen.weights)
    start = time.perf_counter()
    for done, (name, entry) in enumerate(chosen.weights.items()):
        cand = analysis.candidate(name)
        assert cand is not None  # make_plan / validate_plan only keep candidates
        if progress is not None:
            progress(name, done, total)
        ready = prepared.pop(name, None)
        if ready is not None and ready.method == entry.method and entry.rank is not None:
            factors = ready.lowrank(cand.matrix(), entry.rank)
        else:
            factors = factorize_entry(name, entry, cand.matrix(), stats)
        del ready
        if entry.method in ("kron", "losparse"):
            groups[entry.method][name] = factors
        elif cand.members:
            groups["joint"][name] = factors
        else:
            groups[cand.kind][name] = factors
    if progress is not None:
        progress("", total, total)
    seconds["decompose"] = time.perf_counter() - start

    start = time.perf_counter()
    passes = ir.passes.PassManager(
        [
            LowRankLinearPass(groups["linear"]),
            JointLinearPass(groups["joint"]),
            LowRankEmbeddingPass(groups["embedding"]),
            KroneckerPass(groups["kron"]),
            LowRankSparsePass(groups["losparse"]),
            RemoveReplacedWeightsPass(member_names(chosen.weights, analysis)),
        ],
        steps=1,
    )
    passes(model)
    del groups
    seconds["rewrite"] = time.perf_counter() - start
    model_params_after = _model_params(model)

    start = time.perf_counter()
    written = save_model(model, target, external_data=external_data)
    plan_file = plan_path_for(target)
    write_text_atomic(plan_file, chosen.to_json())
    seconds["save"] = time.perf_counter() - start
    totals = chosen.totals()
    logger.info("Factorized %d weights into %s", len(chosen.weights), target)
    return CompressResult(
        plan=chosen,
        factorized=len(chosen.weights),
        skipped=len(chosen.skipped),
        params_before=totals["params_before"],
        params_after=totals["params_after"],
        flops_before=totals["flops_before"],
        flops_after=totals["flops_after"],
        model_params_before=model_params_before,
        model_params_after=model_params_after,
        output_paths=written,
        plan_path=plan_file,
        seconds=seconds,
    )


make_module_callable(__name__, compress)
