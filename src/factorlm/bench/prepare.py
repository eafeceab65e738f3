"""Everything before the first timed inference: options, goals, data, runners and the latency grid.

Whatever a user can get wrong (unknown goal, missing labels, unreadable baseline, models that do
not match) fails here, with one sentence, before any stage of ``factorlm.bench.stages`` runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from factorlm.bench.context import BenchContext, Progress
from factorlm.bench.decode import decode_grid, decoder_layout, max_positions_of, point_feeds
from factorlm.bench.feeds import Shape, default_shapes, make_feeds, parse_shapes, vocab_size_of
from factorlm.bench.footprint import MemoryProbe, engine_size
from factorlm.bench.generation import require_decoder
from factorlm.bench.goals import Goal, goals_from_options, load_goals, parse_percent
from factorlm.bench.report import load_report
from factorlm.bench.runners import BaseRunner, TensorMeta, load_runner
from factorlm.bench.tasks import check_dataset, load_dataset
from factorlm.errors import ConfigError
from factorlm.options import BenchOptions, replace

__all__ = [
    "DEFAULT_MAX_REGRESSION",
    "check_match",
    "open_runners",
    "parse_model_arg",
    "plan_grid",
    "prepare_context",
    "probe_memory",
    "resolve_options",
]

logger = logging.getLogger(__name__)

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


def check_match(reference: BaseRunner, candidate: BaseRunner) -> None:
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


def _resolve_task(opts: BenchOptions, data: Path | None) -> str | None:
    """``auto``: no task without data; classification with a label column, else perplexity."""
    if opts.task == "none":
        return None
    if opts.task == "auto":
        if data is None:
            return None
        return "classification" if opts.label_column else "perplexity"
    return opts.task


def resolve_options(options: BenchOptions | None, overrides: dict[str, Any]) -> BenchOptions:
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


def prepare_context(
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


def open_runners(ctx: BenchContext, stack: ExitStack, first: Path) -> None:
    """Enter every runner into ``stack``: the reference plans the latency grid, each candidate must
    match its inputs and outputs; engine size and session memory are recorded per runner."""
    for runner in ctx.runners:
        probe = MemoryProbe.start()
        stack.enter_context(runner)
        if runner is ctx.reference:
            plan_grid(ctx, first)
        else:
            check_match(ctx.reference, runner)
        ctx.engines[runner.name] = {
            **engine_size(runner.path),
            "memory": probe_memory(ctx, runner, probe),
        }


def plan_grid(ctx: BenchContext, first: Path) -> None:
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


def probe_memory(ctx: BenchContext, runner: BaseRunner, probe: MemoryProbe) -> dict[str, Any]:
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
