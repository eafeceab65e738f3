"""``run_benchmark``: latency, fidelity, task metrics and goals of candidates against a reference.

The work is a loop over typed stages (``STAGES``: latency, task, fidelity, goals, report), each a
small class that reads and fills one ``BenchContext``. Everything a user can get wrong (unknown
goal, missing labels, unreadable baseline, models that do not match) is checked in ``_prepare``
before the first timed inference, and the slow stages report progress through one callback.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from factorlm.bench.accuracy import FidelityAccumulator
from factorlm.bench.decode import (
    DecodePoint,
    DecoderLayout,
    decode_grid,
    decoder_layout,
    max_positions_of,
    point_feeds,
)
from factorlm.bench.feeds import Shape, default_shapes, make_feeds, parse_shapes, vocab_size_of
from factorlm.bench.footprint import MemoryProbe, engine_size
from factorlm.bench.generation import generation_task, require_decoder
from factorlm.bench.goals import (
    Goal,
    GoalResult,
    evaluate_goals,
    goals_from_options,
    load_goals,
    parse_percent,
)
from factorlm.bench.latency import (
    environment_info,
    latency_summary,
    measure_alternating,
    speedup_interval,
)
from factorlm.bench.report import SCHEMA, SCHEMA_VERSION, Report, load_report
from factorlm.bench.runners import BaseRunner, TensorMeta, load_runner
from factorlm.bench.tasks import (
    Dataset,
    check_dataset,
    classification_task,
    load_dataset,
    load_tokenizer,
    perplexity_task,
    similarity_task,
)
from factorlm.errors import ConfigError
from factorlm.options import BenchOptions, replace

__all__ = [
    "DEFAULT_MAX_REGRESSION",
    "STAGES",
    "BenchContext",
    "BenchStage",
    "Progress",
    "parse_model_arg",
    "run_benchmark",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
DEFAULT_MAX_REGRESSION = 5.0


def parse_model_arg(value: str | Path | tuple[str, str | Path]) -> tuple[str | None, Path]:
    """``PATH`` or ``NAME=PATH`` (when PATH exists or NAME is not itself a path) -> (name, path)."""
    if isinstance(value, tuple):
        return value[0], Path(value[1])
    text = str(value)
    if "=" in text and not Path(text).exists():
        name, _, path = text.partition("=")
        if name and path:
            return name, Path(path)
    return None, Path(text)


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def _signature(metas: Sequence[TensorMeta]) -> dict[str, str]:
    return {m.name: m.dtype for m in metas}


def _check_match(reference: BaseRunner, candidate: BaseRunner) -> None:
    for kind in ("inputs", "outputs"):
        ref = _signature(getattr(reference, kind))
        cand = _signature(getattr(candidate, kind))
        if ref != cand:
            missing = sorted(set(ref) - set(cand))
            extra = sorted(set(cand) - set(ref))
            typed = sorted(n for n in set(ref) & set(cand) if ref[n] != cand[n])
            why = "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unexpected {', '.join(extra)}" if extra else "",
                    ", ".join(f"{n} is {cand[n]} not {ref[n]}" for n in typed),
                )
                if part
            )
            raise ConfigError(
                f"Candidate {candidate.name}'s {kind} do not match reference {reference.name}'s ({why})."
            )


def _resolve_goals(
    goals: Sequence[Goal] | Path | str | Mapping[str, Any] | list[Any] | None,
) -> list[Goal]:
    if goals is None:
        return []
    if isinstance(goals, str | Path):
        return load_goals(Path(goals))
    if isinstance(goals, Mapping):
        return load_goals(goals)
    items = list(goals)
    if all(isinstance(g, Goal) for g in items):
        return items
    return load_goals(items)


@dataclass
class BenchContext:
    """What the stages share: the validated inputs, the open runners and the report sections."""

    options: BenchOptions
    runners: list[BaseRunner]
    task: str | None
    dataset: Dataset | None
    goals: list[Goal]
    baseline: Mapping[str, Any] | None
    grid: list[Shape]
    vocab: int | None
    feed_rng: np.random.Generator
    boot_rng: np.random.Generator
    order_rng: np.random.Generator
    progress: Progress | None = None
    decoder: DecoderLayout | None = None  # the KV-cache layout of a decoder exported with past
    points: list[DecodePoint] = field(default_factory=list)  # its prefill/decode latency grid
    engines: dict[str, Any] = field(default_factory=dict)  # size on disk and session memory
    latency: list[dict[str, Any]] = field(default_factory=list)
    random_fidelity: list[FidelityAccumulator] = field(default_factory=list)
    data_fidelity: list[FidelityAccumulator] = field(default_factory=list)
    task_result: dict[str, Any] | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    results: list[GoalResult] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> BaseRunner:
        return self.runners[0]

    @property
    def candidates(self) -> list[BaseRunner]:
        return self.runners[1:]


class BenchStage(Protocol):
    """One step of the benchmark: reads the context, fills its own part of it."""

    name: ClassVar[str]

    def run(self, ctx: BenchContext) -> None: ...


class LatencyStage:
    """Alternating timed rounds per grid point, plus fidelity on the same random inputs.

    A decoder exported with past gets its prefill and decode-step points first (``ctx.points``,
    also reported per token); the ``BATCHxSEQUENCE`` grid follows (for such a decoder only when
    ``shapes`` was given).
    """

    name: ClassVar[str] = "latency"

    def run(self, ctx: BenchContext) -> None:
        ctx.random_fidelity = [FidelityAccumulator() for _ in ctx.candidates]
        if ctx.decoder is not None:
            for point in ctx.points:
                feeds = point_feeds(
                    ctx.reference.inputs, ctx.decoder, point, rng=ctx.feed_rng, vocab_size=ctx.vocab
                )
                extra = {"phase": point.phase, "batch": point.batch, "seq": point.seq,
                         "past": point.past, "tokens": point.tokens}  # fmt: skip
                # a random cache is no input a model meets: fidelity only on prefill points
                self._measure(ctx, point.label, feeds, None, extra, fidelity=not point.past)
        for shape in ctx.grid:
            feeds = make_feeds(ctx.reference.inputs, shape, rng=ctx.feed_rng, vocab_size=ctx.vocab)
            extra = {"batch": shape.batch, "seq": shape.seq}
            self._measure(ctx, shape.label, feeds, feeds.get("attention_mask"), extra)

    @staticmethod
    def _measure(
        ctx: BenchContext,
        label: str,
        feeds: dict[str, np.ndarray],
        mask: np.ndarray | None,
        extra: dict[str, Any],
        *,
        fidelity: bool = True,
    ) -> None:
        opts = ctx.options
        if fidelity:
            outputs = [r.infer(feeds) for r in ctx.runners]
            for acc, out in zip(ctx.random_fidelity, outputs[1:], strict=True):
                acc.add(outputs[0], out, mask)
            del outputs

        def tick(i: int) -> None:
            if ctx.progress is not None:
                ctx.progress(f"latency {label}", i + 1, opts.iterations)

        times = measure_alternating(
            ctx.runners,
            feeds,
            warmup=opts.warmup,
            iterations=opts.iterations,
            rng=ctx.order_rng,
            on_iteration=tick,
        )
        results = {
            r.name: latency_summary(times[:, k], extra["batch"]) for k, r in enumerate(ctx.runners)
        }
        tokens = extra.get("tokens")
        if tokens:  # decoders: per prompt token (prefill) or generated token (decode), from p50
            for res in results.values():
                res["ms_per_token"] = res["p50_ms"] / tokens
                res["tokens_per_s"] = tokens * 1e3 / res["p50_ms"] if res["p50_ms"] > 0 else None
        entry: dict[str, Any] = {
            "shape": label,
            **extra,
            "results": results,
            "speedup": {
                r.name: speedup_interval(
                    times[:, 0], times[:, k], rng=ctx.boot_rng, confidence=opts.confidence
                ).to_dict()
                for k, r in enumerate(ctx.runners)
                if k > 0
            },
        }
        ctx.latency.append(entry)
        logger.info(
            "%s: %s",
            label,
            ", ".join(f"{n} p50 {v['p50_ms']:.3f} ms" for n, v in results.items()),
        )


class TaskStage:
    """The task metric (classification, similarity or perplexity) on real data, if any."""

    name: ClassVar[str] = "task"

    def run(self, ctx: BenchContext) -> None:
        opts = ctx.options
        ctx.data_fidelity = [FidelityAccumulator() for _ in ctx.candidates]
        if ctx.dataset is None or ctx.task is None:
            return
        folders: list[Path | None] = [r.folder or r.path.parent for r in ctx.runners]
        tok = load_tokenizer(folders, opts.tokenizer)
        result: dict[str, Any]
        if ctx.task == "classification":
            result = classification_task(
                ctx.runners,
                tok,
                ctx.dataset,
                seed=opts.seed,
                folds=opts.folds,
                resamples=opts.bootstrap_resamples,
                confidence=opts.confidence,
                batch_size=opts.batch_size,
                max_length=opts.max_length,
                fidelity=ctx.data_fidelity,
                progress=ctx.progress,
            )
        elif ctx.task == "generation":
            result = generation_task(
                ctx.runners,
                tok,
                ctx.dataset.texts[: opts.generation_prompts],
                max_new_tokens=opts.max_new_tokens,
                max_length=opts.max_length,
                progress=ctx.progress,
            )
        elif ctx.task == "similarity":
            result = similarity_task(
                ctx.runners,
                tok,
                ctx.dataset,
                batch_size=opts.batch_size,
                max_length=opts.max_length,
                fidelity=ctx.data_fidelity,
                progress=ctx.progress,
            )
        else:
            result = perplexity_task(
                ctx.runners,
                tok,
                ctx.dataset,
                window=opts.window,
                stride=opts.stride,
                max_windows=opts.max_windows,
                progress=ctx.progress,
            )
        result["data"] = str(ctx.dataset.path)
        result["rows"] = len(ctx.dataset.texts)
        ctx.task_result = result


class FidelityStage:
    """Output agreement with the reference: on the real data when there was any, else random."""

    name: ClassVar[str] = "fidelity"

    def run(self, ctx: BenchContext) -> None:
        for cand, rnd, real in zip(
            ctx.candidates, ctx.random_fidelity, ctx.data_fidelity, strict=True
        ):
            on_data = bool(real.outputs)
            ctx.fidelity[cand.name] = {
                "inputs": "data" if on_data else "random",
                "outputs": real.result() if on_data else rnd.result(),
                "random": rnd.result(),
            }


class ReportStage:
    """The report data (schema ``factorlm.bench.report``) from every earlier stage."""

    name: ClassVar[str] = "report"

    def run(self, ctx: BenchContext) -> None:
        opts = ctx.options
        described = [_describe(r) for r in ctx.runners]
        ctx.data = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "environment": environment_info(),
            "settings": {
                "shapes": [s.label for s in ctx.grid],
                "warmup": opts.warmup,
                "iterations": opts.iterations,
                "seed": opts.seed,
                "confidence": opts.confidence,
                "task": ctx.task,
                "data": str(ctx.dataset.path) if ctx.dataset is not None else None,
                "labels": list(opts.labels) if opts.labels is not None else None,
                "max_samples": opts.max_samples,
                "skip_rows": opts.skip_rows,
                "max_length": opts.max_length,
                "regression_basis": opts.regression_basis,
                "baseline": str(opts.baseline) if opts.baseline is not None else None,
                "vocab_size": ctx.vocab,
                "prefill_lengths": list(opts.prefill_lengths) if ctx.decoder else None,
                "decode_past": list(opts.decode_past) if ctx.decoder else None,
                "decode_batches": list(opts.decode_batches) if ctx.decoder else None,
                "max_new_tokens": opts.max_new_tokens if ctx.task == "generation" else None,
                "generation_prompts": (
                    opts.generation_prompts if ctx.task == "generation" else None
                ),
            },
            "reference": described[0],
            "candidates": described[1:],
            "engines": ctx.engines,
            "latency": ctx.latency,
            "fidelity": ctx.fidelity,
            "task": ctx.task_result,
        }


class GoalsStage:
    """Pass/fail of every goal against the report data (and the baseline report)."""

    name: ClassVar[str] = "goals"

    def run(self, ctx: BenchContext) -> None:
        ctx.results = evaluate_goals(
            ctx.goals,
            ctx.data,
            baseline=ctx.baseline,
            regression_basis=ctx.options.regression_basis,
            rng=ctx.boot_rng,
        )


#: The stages in order; all run while the runners are open.
STAGES: tuple[BenchStage, ...] = (
    LatencyStage(),
    TaskStage(),
    FidelityStage(),
    ReportStage(),
    GoalsStage(),
)


def _resolve_task(opts: BenchOptions, data: Path | None) -> str | None:
    """``auto``: no task without data; classification with a label column, else perplexity."""
    if opts.task == "none":
        return None
    if opts.task == "auto":
        if data is None:
            return None
        return "classification" if opts.label_column else "perplexity"
    return opts.task


def _options(options: BenchOptions | None, overrides: dict[str, Any]) -> BenchOptions:
    """Apply keyword overrides, accepting the older spellings of a few values."""
    changes = dict(overrides)
    if "goals" in changes and isinstance(changes["goals"], str | Path):
        changes["goals_file"] = changes.pop("goals")
    if changes.get("task", "") is None:
        changes["task"] = "none"
    if changes.get("backend") == "onnxruntime":
        changes["backend"] = "ort"
    if isinstance(changes.get("max_regression"), str):
        changes["max_regression"] = parse_percent(changes["max_regression"])
    if "shapes" in changes:
        changes["shapes"] = tuple(
            s.label if isinstance(s, Shape) else str(s) for s in changes["shapes"] or ()
        )
    for name in ("providers", "labels"):
        if changes.get(name) is not None:
            changes[name] = tuple(changes[name])
    for name in ("tokenizer", "baseline"):
        if isinstance(changes.get(name), str):
            changes[name] = Path(changes[name])
    base = options or BenchOptions()
    return replace(base, **changes) if changes else base


def _prepare(
    reference: str | Path,
    candidates: Sequence[str | Path | tuple[str, str | Path]],
    opts: BenchOptions,
    data: Path | None,
    goals: Sequence[Goal] | Mapping[str, Any] | None,
    baseline: Mapping[str, Any] | None,
    progress: Progress | None,
) -> BenchContext:
    """Every check that can fail on user input, before the first timed inference."""
    if not candidates:
        raise ConfigError("Give at least one candidate model to compare with the reference.")
    task = _resolve_task(opts, data)
    goal_list = (
        _resolve_goals(opts.goals_file)
        + _resolve_goals(goals)
        + goals_from_options(
            max_accuracy_drop=opts.max_accuracy_drop,
            min_speedup=opts.min_speedup,
            max_fidelity_loss=opts.max_fidelity_loss,
            max_regression=opts.max_regression,
        )
    )
    baseline_data = baseline
    if baseline_data is None and opts.baseline is not None:
        baseline_data = load_report(opts.baseline)
    if baseline_data is not None and not any(g.type == "max-regression" for g in goal_list):
        goal_list.append(Goal("max-regression", DEFAULT_MAX_REGRESSION))
    if any(g.type == "max-regression" for g in goal_list) and baseline_data is None:
        raise ConfigError("Goal max-regression needs a baseline report (--baseline report.json).")
    if task is not None and data is None:
        raise ConfigError(f"Task {task} needs a data file (--data).")
    if any(g.type == "max-accuracy-drop" for g in goal_list) and task is None:
        raise ConfigError("Goal max-accuracy-drop needs labelled data (--data and --task).")
    dataset = None
    if data is not None and task is not None:
        dataset = load_dataset(
            data,
            text_column=opts.text_column,
            label_column=opts.label_column,
            labels=opts.labels,
            limit=opts.max_samples if task not in ("perplexity", "generation") else None,
            seed=opts.seed,
            skip_rows=opts.skip_rows,
        )
        check_dataset(dataset, task)
    grid = parse_shapes(opts.shapes) if opts.shapes else []

    parsed = [parse_model_arg(reference)] + [parse_model_arg(c) for c in candidates]
    runners = [
        load_runner(
            path,
            name=name,
            backend="onnxruntime" if opts.backend == "ort" else opts.backend,
            providers=opts.providers or None,
            intra_op_threads=opts.threads,
            graph_optimization_level=opts.graph_optimization_level,
        )
        for name, path in parsed
    ]
    for runner, name in zip(runners, _unique_names([r.name for r in runners]), strict=True):
        runner.name = name
    feed_rng, boot_rng, order_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(opts.seed).spawn(3)
    )
    return BenchContext(
        options=opts,
        runners=runners,
        task=task,
        dataset=dataset,
        goals=goal_list,
        baseline=baseline_data,
        grid=grid,
        vocab=None,
        feed_rng=feed_rng,
        boot_rng=boot_rng,
        order_rng=order_rng,
        progress=progress,
    )


def run_benchmark(
    reference: str | Path,
    candidates: Sequence[str | Path | tuple[str, str | Path]],
    options: BenchOptions | None = None,
    *,
    data: str | Path | None = None,
    goals: Sequence[Goal] | Mapping[str, Any] | Path | str | None = None,
    baseline: Mapping[str, Any] | str | Path | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> Report:
    """Benchmark ``candidates`` against ``reference`` and judge the goals.

    Models are paths (file, export folder or engine folder) or ``NAME=PATH``. ``options``
    (``BenchOptions``) says how to measure; keyword ``overrides`` replace single options
    (``run_benchmark(ref, [cand], shapes=["1x128"], iterations=10)``). Goals come from
    ``options.goals_file``, ``goals`` (Goal objects, a mapping or a YAML path) and the goal
    options; a baseline (``options.baseline`` or a loaded report mapping) without an explicit
    ``max_regression`` gates at 5 %. Raises ``FactorlmError`` subclasses on usage errors.
    """
    if isinstance(baseline, str | Path):
        overrides["baseline"] = Path(baseline)
        baseline = None
    if isinstance(goals, str | Path):
        overrides["goals_file"] = Path(goals)
        goals = None
    opts = _options(options, overrides)
    ctx = _prepare(
        reference,
        candidates,
        opts,
        Path(data) if data is not None else None,
        goals,
        baseline,
        progress,
    )
    first = Path(parse_model_arg(reference)[1])
    with ExitStack() as stack:
        for runner in ctx.runners:
            probe = MemoryProbe.start()
            stack.enter_context(runner)
            if runner is ctx.reference:
                _plan_grid(ctx, first)
            else:
                _check_match(ctx.reference, runner)
            ctx.engines[runner.name] = {**engine_size(runner.path), "memory": _probe(ctx, runner, probe)}
        for stage in STAGES:
            stage.run(ctx)
    return Report(ctx.data, ctx.results)


def _plan_grid(ctx: BenchContext, first: Path) -> None:
    """The latency grid from the open reference: decode points for a decoder with past."""
    ref = ctx.reference
    ctx.vocab = vocab_size_of(ref.path) or vocab_size_of(first / "model.onnx")
    ctx.decoder = decoder_layout(ref.inputs, ref.outputs)
    if ctx.task == "generation":
        require_decoder(ref)
    if ctx.decoder is None:
        ctx.grid = ctx.grid or default_shapes(ref.inputs)
        return
    opts = ctx.options
    ctx.points = decode_grid(
        opts.prefill_lengths,
        opts.decode_past,
        opts.decode_batches,
        max_positions=max_positions_of(ref.folder or ref.path.parent),
    )
    if not ctx.points and not ctx.grid:
        raise ConfigError(
            "No latency point left: give prefill lengths, or decode past lengths and batches."
        )


def _probe(ctx: BenchContext, runner: BaseRunner, probe: MemoryProbe) -> dict[str, Any]:
    """One inference at the largest grid point, closing the memory probe of ``runner``."""
    label, feeds = None, None
    if ctx.decoder is not None and ctx.points:
        point = max(ctx.points, key=lambda p: (p.batch * (p.past + p.seq), p.batch))
        label = point.label
        feeds = point_feeds(
            runner.inputs, ctx.decoder, point, rng=np.random.default_rng(0), vocab_size=ctx.vocab
        )
    elif ctx.grid:
        shape = max(ctx.grid, key=lambda s: (s.batch * s.seq, s.batch))
        label = shape.label
        feeds = make_feeds(runner.inputs, shape, rng=np.random.default_rng(0), vocab_size=ctx.vocab)
    outputs = runner.infer(feeds) if feeds is not None else {}
    memory = probe.finish([feeds or {}, outputs])
    memory["probe"] = label
    return memory


def _describe(runner: BaseRunner) -> dict[str, Any]:
    info = runner.describe()
    info["inputs"] = [m.to_dict() for m in runner.inputs]
    info["outputs"] = [m.to_dict() for m in runner.outputs]
    if runner.manifest is not None:
        info["manifest"] = runner.manifest
    return info
