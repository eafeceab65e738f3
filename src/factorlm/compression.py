"""``compress``: load, analyse, plan, factorize, rewrite and save, as one Python call.

(``factorlm.compress`` is this module's ``compress`` function; the module is named
``compression`` so that the package attribute and the module cannot shadow each other.)

The stages are kept apart so each can be checked on its own: ``passes.analyze`` finds the
weights, ``planning.make_plan`` (or a user's plan through ``planning.validate_plan``) decides
ranks, ``factorlm.decompose`` computes every number, the passes only rewire the graph, and
``io.save_model`` writes atomically after the full ONNX check. Nothing is written until every
user input has been validated, so a mistake leaves no output file behind.

Memory stays near one weight: an input with external data is read weight by weight from its file
(``streaming.StreamedTensor``), each weight is rewritten as soon as its factors exist and its
factors go to a spill file (``streaming.FactorSpill``), and the output keeps its weights in
external data, copied file to file on save. With ``options.ray_address`` the factorizations run
as Ray tasks that read their weight by offset (``distributed``); the output is bit-identical.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from factorlm._common.files import write_text_atomic
from factorlm._common.outputs import (
    check_output,
    external_data_files,
    make_stage,
    remove_stage,
)
from factorlm.calibration.stats import drop_mapped_pages, paged_statistics
from factorlm.decompose import PreparedWeight, kronecker, lowrank_plus_sparse, prepared_lowrank
from factorlm.errors import ConfigError, ModelLoadError
from factorlm.io import load_model, save_model
from factorlm.options import CompressOptions, replace
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
from factorlm.planning import (
    DATA_AWARE,
    Plan,
    StatsLike,
    WeightPlan,
    factor_statistics,
    load_plan,
    make_plan,
    validate_plan,
)
from factorlm.streaming import FactorSpill, WeightSource, stream_model, weight_ref

__all__ = [
    "DEFAULT_MIN_SIZE",
    "CompressResult",
    "compress",
    "factorize_entry",
    "factorize_weight",
    "plan_path_for",
]

logger = logging.getLogger(__name__)

#: Matrices with fewer elements are not worth a factorization's extra node.
DEFAULT_MIN_SIZE = CompressOptions().min_size


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


def _model_params(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += int(np.prod(value.const_value.shape.numpy(), dtype=np.int64))
    return total


def _collect(
    model: Path, data: Path, tokenizer: str | os.PathLike[str] | None, opts: CompressOptions
) -> StatsLike | None:
    """What ``opts`` needs from calibration texts; without the PyTorch weights (not an input of
    ``compress``), so the Fisher, the output Fisher and sampled text are refused here."""
    from factorlm.calibration.requested import collect_requested

    return collect_requested(
        model,
        data,
        opts,
        torch_folder=None,
        tokenizer=Path(tokenizer) if tokenizer is not None else None,
    )


def shrunk_statistics(stats: Any) -> Any:
    """A copy of ``stats`` whose Grams are shrunk toward their diagonal (``shrinkage auto``).

    Each Gram's shrinkage is the one under which its held-back batches are most likely
    (``decompose.best_shrinkage``): a Gram fitted on few or narrow texts is pulled toward its
    diagonal, one fitted on plenty of varied text is left alone.
    """
    from factorlm.decompose import best_shrinkage, shrink_gram

    held, n_held = _held_back(stats, "shrinkage")

    def shrink(name: str, gram: np.ndarray) -> tuple[float, np.ndarray]:
        alpha = best_shrinkage(gram - held[name], stats.tokens - n_held, held[name], n_held)
        return alpha, shrink_gram(gram, alpha) if alpha > 0 else gram

    result, chosen = _map_grams(stats, held, shrink)
    logger.info("Gram shrinkage by held-back likelihood: %s", dict(sorted(chosen.items())))
    return result


def _held_back(stats: Any, option: str) -> tuple[dict[str, np.ndarray], int]:
    """The held-back Grams and their token count that ``option`` auto chooses by."""
    held = getattr(stats, "gram_heldout", None) or {}
    n_held = int(getattr(stats, "heldout_tokens", 0))
    if not held or n_held < 1 or n_held >= stats.tokens:
        raise ConfigError(
            f"compress option '{option}' auto needs statistics collected with a held-back part "
            "(collect_statistics(..., holdout=True); the CLI and factorlm run do this)."
        )
    return held, n_held


def _map_grams(
    stats: Any,
    names: Any,
    transform: Callable[[str, np.ndarray], tuple[float, np.ndarray]],
    values: dict[str, float] | None = None,
) -> tuple[Any, dict[float, int]]:
    """A copy of ``stats`` with ``transform`` applied to the Gram of every weight in ``names``.

    Weights reading one input share one Gram; it is transformed once, whether they share one
    object or (read back from ``.npz``) hold equal copies, found by a digest of the bytes.
    Returns the copy and how many Grams got each chosen value (for the log line); ``values``,
    when given, receives the value chosen for each weight.
    """
    import hashlib

    result = copy.copy(stats)
    result.gram = dict(stats.gram)
    chosen: dict[float, int] = {}
    done: dict[str, tuple[float, np.ndarray]] = {}
    digests: dict[int, str] = {}
    for name, gram in stats.gram.items():
        if name not in names:
            continue
        if id(gram) not in digests:
            data = np.ascontiguousarray(gram)
            digest = hashlib.blake2b(data.data, digest_size=16)
            digests[id(gram)] = f"{data.shape}{data.dtype}{digest.hexdigest()}"
        key = digests[id(gram)]
        if key not in done:
            done[key] = transform(name, gram)
            chosen[done[key][0]] = chosen.get(done[key][0], 0) + 1
        result.gram[name] = done[key][1]
        if values is not None:
            values[name] = done[key][0]
    return result, chosen


def blended_statistics(stats: Any, weight: float | None, *, loss_aware: bool = False) -> Any:
    """A copy of ``stats`` whose Grams are blended with their generic-text Grams (``blend``).

    ``weight`` fixes the generic share ``β``; None chooses it per Gram by the likelihood of the
    calibration data's held-back batches (``decompose.best_blend``). Why: a Gram fitted on one
    genre whitens the directions other text uses poorly; the generic Gram restores them.
    With ``loss_aware`` the output Fisher is blended with its generic-text Fisher
    (``output_fisher_generic``) by the β of the weight's input Gram; a full output Gram is not.
    """
    from factorlm.decompose import best_blend, blend_gram

    generic = getattr(stats, "gram_generic", None) or {}
    n_generic = int(getattr(stats, "generic_tokens", 0))
    if not generic or n_generic < 1:
        raise ConfigError(
            "compress option 'blend' needs the Grams on generic text (stats.gram_generic; the "
            "CLI, factorlm run and compress(data=...) collect them)."
        )
    held, n_held = _held_back(stats, "blend") if weight is None else ({}, 0)
    betas: dict[str, float] = {}  # per weight: Q/K/V share one Gram and so one β

    def blend(name: str, gram: np.ndarray) -> tuple[float, np.ndarray]:
        beta = weight
        if beta is None:
            beta = best_blend(
                gram - held[name], stats.tokens - n_held, held[name], n_held,
                generic[name], n_generic,
            )  # fmt: skip
        return beta, blend_gram(gram, stats.tokens, generic[name], n_generic, beta)

    result, chosen = _map_grams(stats, generic, blend, betas)
    logger.info("Gram blend with generic text: %s", dict(sorted(chosen.items())))
    own = getattr(stats, "output_fisher", None) or {}
    generic_fisher = getattr(stats, "output_fisher_generic", None) or {}
    if loss_aware and own and generic_fisher:
        # The output Fisher is a sum over the same tokens as the Gram (same texts, same
        # max_length), so it blends per token the same way, with the β of the weight's input
        # Gram: the generic set weights the output features other text needs too.
        result.output_fisher = dict(own)
        blended = 0
        for name, fisher in own.items():
            beta = betas.get(name)
            if beta is None or name not in generic_fisher:
                continue
            result.output_fisher[name] = blend_gram(
                fisher, stats.tokens, generic_fisher[name], n_generic, beta
            )
            blended += 1
        logger.info("Output Fisher blended with generic text's for %d weights", blended)
    elif loss_aware and own:
        logger.warning(
            "compress option 'blend' blends only the Grams: the statistics have no output "
            "Fisher on generic text (output_fisher_generic; the CLI, factorlm run and "
            "calibration.requested.generic_statistics(fisher_weights=...) collect it)."
        )
    return result


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
    if key is not None:  # the planner's rule would say PlanError; a replayed plan names its input
        table = getattr(stats, key, None) if stats is not None else None
        if table is None or name not in table:
            raise ConfigError(
                f"plan weight {name!r} uses method {entry.method!r}, which needs calibration "
                f"statistics ({key}): pass --calib DATA or --stats STATS.npz."
            )
    found = factor_statistics(stats, entry.method, name, embedding=entry.kind == "embedding")
    return prepared_lowrank(matrix, entry.method, entry.rank, **found)


def factorize_weight(
    name: str,
    entry: WeightPlan,
    matrix: np.ndarray,
    stats: StatsLike | None,
    ready: PreparedWeight | None = None,
) -> Any:
    """One weight's factors: from the planner's prepared spectrum when it matches, else
    ``factorize_entry``. The local loop and the Ray tasks both call this, so they agree bitwise."""
    if ready is not None and ready.method == entry.method and entry.rank is not None:
        return ready.lowrank(matrix, entry.rank)
    return factorize_entry(name, entry, matrix, stats)


def factorize_source(
    name: str,
    entry: WeightPlan,
    source: WeightSource,
    stats: StatsLike | None,
    ready: PreparedWeight | None,
) -> Any:
    """``factorize_weight`` on a weight read from its address (what a Ray task runs)."""
    return factorize_weight(name, entry, source.matrix(), stats, ready)


@dataclass
class _OneWeightStats:
    """The statistics of one weight only: what a Ray task is sent instead of the model's."""

    gram: dict[str, np.ndarray] = field(default_factory=dict)
    mean_abs: dict[str, np.ndarray] = field(default_factory=dict)
    fisher: dict[str, np.ndarray] = field(default_factory=dict)
    output_fisher: dict[str, np.ndarray] = field(default_factory=dict)
    output_gram: dict[str, np.ndarray] = field(default_factory=dict)
    token_counts: dict[str, np.ndarray] = field(default_factory=dict)


def _one_weight(stats: StatsLike | None, name: str) -> StatsLike | None:
    if stats is None:
        return None
    kinds = ("gram", "mean_abs", "fisher", "output_fisher", "output_gram", "token_counts")
    tables = {k: getattr(stats, k, None) or {} for k in kinds}
    return _OneWeightStats(**{k: {name: t[name]} if name in t else {} for k, t in tables.items()})


def _source(model: ir.Model, cand: Any) -> WeightSource:
    """Where a Ray task reads ``cand``'s matrix: external data by offset, else the array."""
    parts = []
    for member in cand.members or (cand.name,):
        tensor = model.graph.initializers[member].const_value
        assert tensor is not None  # analysis only keeps constant initializers
        ref = weight_ref(tensor)
        parts.append(ref if ref is not None else tensor.numpy())
    return WeightSource(tuple(parts), transposed=bool(cand.transposed))


def _factors(
    model: ir.Model,
    chosen: Plan,
    analysis: Any,
    stats: StatsLike | None,
    prepared: dict[str, PreparedWeight],
    ray_address: str | None,
) -> Iterator[Any]:
    """Every planned weight's factors, in plan order: computed here, or as Ray tasks."""
    if ray_address is None:
        for name, entry in chosen.weights.items():
            cand = analysis.candidate(name)
            assert cand is not None  # make_plan / validate_plan only keep candidates
            yield factorize_weight(name, entry, cand.matrix(), stats, prepared.pop(name, None))
        return
    from factorlm.distributed import ordered_map, ray_session

    with ray_session(ray_address):
        jobs = (
            (
                name,
                entry,
                _source(model, analysis.candidate(name)),
                _one_weight(stats, name),
                prepared.pop(name, None),
            )
            for name, entry in chosen.weights.items()
        )
        yield from ordered_map(factorize_source, jobs)


def _sequential_factors(
    model: ir.Model,
    source: Path,
    chosen: Plan,
    analysis: Any,
    stats: StatsLike | None,
    prepared: dict[str, PreparedWeight],
    opts: CompressOptions,
    data: str | os.PathLike[str] | None,
    tokenizer: str | os.PathLike[str] | None,
) -> Iterator[tuple[str, Any]]:
    """``(name, factors)`` with the whitened linear weights refit block by block (``sequential``).

    Everything else in the plan (embeddings, other methods) is factorized first, as usual.
    """
    import onnx

    from factorlm._common.text import TextTokenizer, find_tokenizer
    from factorlm.calibration import find_targets
    from factorlm.data import load_texts
    from factorlm.sequential import activations_for, block_order, refit_sequentially

    assert data is not None and stats is not None  # checked with the options
    refit = [
        name
        for name, entry in chosen.weights.items()
        if entry.method in ("whiten", "drone") and entry.rank is not None
        and analysis.candidate(name).kind == "linear"
    ]  # fmt: skip
    for name, entry in chosen.weights.items():
        if name not in refit:
            cand = analysis.candidate(name)
            yield (
                name,
                factorize_weight(name, entry, cand.matrix(), stats, prepared.pop(name, None)),
            )
    prepared.clear()
    original = onnx.load(str(source))
    members = {c.name: c.members for c in analysis.candidates if c.members}
    activation, position = activations_for(refit, members, find_targets(original))
    groups = block_order(refit, activation, position, opts.sequential_blocks)
    output_fisher = dict(getattr(stats, "output_fisher", None) or {})
    for name, full in (getattr(stats, "output_gram", None) or {}).items():
        output_fisher.setdefault(name, np.diag(full))  # the sequential refit takes the diagonal
    yield from refit_sequentially(
        model,
        original,
        groups,
        {n: int(chosen.weights[n].rank or 0) for n in refit},
        lambda n: analysis.candidate(n).matrix(),
        activation,
        gram_of=lambda n: stats.gram[n],
        output_weight_of=lambda n: output_fisher.get(n) if opts.loss_aware else None,
        texts=load_texts(Path(data), opts.text_column, opts.calibration_samples),
        tokenizer=TextTokenizer(
            find_tokenizer(source, explicit=Path(tokenizer) if tokenizer is not None else None)
        ),
        max_length=opts.max_length,
        batch_size=opts.batch_size,
        ridge=opts.sequential_ridge,
    )


_PASSES: dict[str, Callable[[dict[str, Any]], ir.passes.PassBase]] = {
    "linear": LowRankLinearPass,
    "embedding": LowRankEmbeddingPass,
    "joint": JointLinearPass,
    "kron": KroneckerPass,
    "losparse": LowRankSparsePass,
}


def _rewrite_one(
    model: ir.Model,
    name: str,
    group: str,
    factors: Any,
    replaced: list[str],
    spill: FactorSpill | None,
) -> None:
    """Rewrite one weight's uses, drop the original and (with a spill) move its factors to disk.

    One weight at a time keeps at most one weight's factors in memory; the graph equals the one
    the passes build in a single run (each rewrite only inserts before the weight's own nodes).
    """
    before = set(model.graph.initializers)
    _PASSES[group]({name: factors})(model)
    RemoveReplacedWeightsPass(replaced)(model)
    if spill is not None:
        spill.spill(model, [n for n in model.graph.initializers if n not in before])


def compress(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    options: CompressOptions | None = None,
    *,
    stats: StatsLike | None = None,
    plan: Plan | str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    **overrides: Any,
) -> CompressResult:
    """Factorize the linear (and optionally embedding) weights of an ONNX model.

    ``options`` (default ``CompressOptions()``: whiten at ratio 0.6) says how; keyword
    ``overrides`` replace single options (``compress(m, out, method="svd", ratio=0.5)``) and are
    validated like the options object. Writes ``output_path`` (external data above 2 GB or when
    ``options.external_data``) and ``<output>.plan.json``. ``plan`` (a Plan or a JSON path;
    default ``options.plan``) replaces the planner and is validated against the model.
    Data-aware methods need ``stats`` (``CalibrationStats``); for whiten, drone and asvd they are
    collected from ``data`` (texts, ``tokenizer`` folder default: the model's) when not given.
    ``progress(stage, done, total)`` is called while factorizing.
    """
    if overrides.get("external_data", False) is None:  # the old "auto" spelling
        del overrides["external_data"]
    opts = replace(options or CompressOptions(), **overrides) if overrides else options
    opts = opts or CompressOptions()
    if plan is None:
        plan = opts.plan
    source, target = Path(model_path), Path(output_path)
    inputs = [source, *external_data_files(source), tokenizer, data]
    inputs.append(None if plan is None or isinstance(plan, Plan) else Path(plan))
    companions = [plan_path_for(target), target.with_name(target.name + ".data")]
    check_output(target, inputs=inputs, overwrite=True, kind="file", companions=companions)
    if opts.sequential and data is None:
        raise ConfigError(
            "compress option 'sequential' needs the calibration texts (data / --data): it runs "
            "the partially compressed model on them."
        )
    if stats is None and data is not None and plan is None:
        stats = _collect(source, Path(data), tokenizer, opts)
    if opts.loss_aware and not (
        getattr(stats, "output_fisher", None) or getattr(stats, "output_gram", None)
    ):
        raise ConfigError(
            "compress option 'loss_aware' needs the output Fisher: pass stats= with output_fisher "
            "from factorlm.calibration.collect_output_fisher (the CLI and factorlm run collect it) "
            "or output_gram from collect_output_gram."
        )
    if opts.shrinkage == "auto" and stats is not None:
        stats = shrunk_statistics(stats)
    if opts.blending and stats is not None:
        stats = blended_statistics(stats, opts.blend_weight, loss_aware=opts.loss_aware)
    if not opts.loss_aware and (
        getattr(stats, "output_fisher", None) or getattr(stats, "output_gram", None)
    ):
        stats = copy.copy(stats)  # the output Fisher weights the factors only when asked
        stats.output_fisher = {}  # type: ignore[union-attr]
        stats.output_gram = {}  # type: ignore[union-attr]
    method, min_size, joint_qkv = opts.method, opts.min_size, opts.joint_qkv
    external_data = True if opts.external_data else None
    clock = time.perf_counter()
    seconds: dict[str, float] = {}
    model = load_model(source)
    # An input with external data is read weight by weight from its file and the output keeps
    # its weights in external data too, so memory stays near one weight (streaming.py).
    if stream_model(model):
        external_data = True
    loaded = load_plan(plan) if plan is not None else None
    # A plan written with joint candidates ("<q>+<k>+<v>") needs the joint analysis to validate.
    # Kronecker and low-rank + sparse factors have no joint form: their members plan separately.
    if loaded is not None:
        joint = any(JOINT_SEPARATOR in name for name in loaded.weights)
    else:
        joint = joint_qkv and method not in ("kron", "losparse")
    analysis = analyze(model, min_size=min_size, joint=joint)
    for found in analysis.candidates:
        if not np.isfinite(found.matrix()).all():
            raise ModelLoadError(
                f"{source}: weight {found.name!r} holds NaN or Inf values; fix the model first."
            )
    stats = paged_statistics(joint_statistics(stats, analysis))  # memory-mapped: one at a time
    seconds["load"] = time.perf_counter() - clock
    # The planner's eigendecompositions, reused for the factors (one SVD per weight, not two).
    prepared: dict[str, PreparedWeight] = {}
    if loaded is not None:
        chosen = validate_plan(loaded, analysis)
    else:
        latency, target_ms = None, None
        if opts.latency_target:  # measured on the engine, cached per machine (issue 17)
            from factorlm.costmodel import latency_target

            latency, target_ms = latency_target(
                source, analysis.candidates, opts, progress=progress
            )
        chosen = make_plan(
            analysis,
            method=method,
            ratio=opts.ratio,
            energy=opts.energy,
            rank_multiple=opts.rank_multiple,
            include=opts.include,
            exclude=opts.exclude,
            embeddings=opts.embeddings,
            stats=stats,
            sparse_structure=opts.sparse_structure,
            sparse_density=opts.sparse_density,
            allocation=opts.allocation,
            # loss-aware spectra are in loss units: compare weights by absolute error
            error_scale="absolute" if opts.loss_aware else opts.error_scale,
            min_fraction=opts.min_fraction,
            prepared=prepared,
            latency=latency,
            target_ms=target_ms,
        )
    seconds["plan"] = time.perf_counter() - clock - seconds["load"]
    drop_mapped_pages(stats)  # memory-mapped statistics: the planner's Grams are read again later
    model_params_before = _model_params(model)

    total = len(chosen.weights)
    start = time.perf_counter()
    rewrite = 0.0
    stage: Path | None = None
    spill: FactorSpill | None = None
    try:
        stage = make_stage(target.parent, target.name, "compress") if external_data else None
        spill = FactorSpill(stage) if stage is not None else None
        if opts.sequential:
            results: Iterator[tuple[str, Any]] = _sequential_factors(
                model, source, chosen, analysis, stats, prepared, opts, data, tokenizer
            )
        else:
            results = zip(
                chosen.weights,
                _factors(model, chosen, analysis, stats, prepared, opts.ray_address),
                strict=True,
            )
        for done, (name, factors) in enumerate(results):
            entry = chosen.weights[name]
            if progress is not None:
                progress(name, done, total)
            cand = analysis.candidate(name)
            assert cand is not None
            if entry.method in ("kron", "losparse"):
                group = entry.method
            else:
                group = "joint" if cand.members else cand.kind
            tick = time.perf_counter()
            _rewrite_one(model, name, group, factors, member_names([name], analysis), spill)
            drop_mapped_pages(stats)  # keep one weight's Gram resident, not all of them
            rewrite += time.perf_counter() - tick
            del factors
        if progress is not None:
            progress("", total, total)
        seconds["decompose"] = time.perf_counter() - start - rewrite
        seconds["rewrite"] = rewrite
        model_params_after = _model_params(model)

        start = time.perf_counter()
        written = save_model(model, target, external_data=external_data)
    finally:
        if spill is not None:
            spill.close()
            logger.info("Spilled %.1f MB of factors while rewriting", spill.bytes_written / 1e6)
        remove_stage(stage)
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
