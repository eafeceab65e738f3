"""The benchmark's typed stages (latency, task, fidelity, report, goals), run in ``STAGES`` order.

Each stage is a small class that reads and fills one ``BenchContext``; all run while the runners
are open, after every check on user input has passed (``factorlm.bench.prepare``).
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from factorlm._common.text import TextTokenizer, find_tokenizer
from factorlm.bench.accuracy import FidelityAccumulator
from factorlm.bench.context import BenchContext, BenchStage
from factorlm.bench.decode import point_feeds
from factorlm.bench.feeds import make_feeds
from factorlm.bench.generation import generation_task
from factorlm.bench.goals import evaluate_goals
from factorlm.bench.latency import (
    environment_info,
    latency_summary,
    measure_alternating,
    speedup_interval,
)
from factorlm.bench.replay import ReplayRunner
from factorlm.bench.report import SCHEMA, SCHEMA_VERSION
from factorlm.bench.runners import BaseRunner
from factorlm.bench.tasks import (
    classification_task,
    perplexity_task,
    similarity_task,
)

__all__ = [
    "STAGES",
    "FidelityStage",
    "GoalsStage",
    "LatencyStage",
    "ReportStage",
    "TaskStage",
]

logger = logging.getLogger(__name__)


class LatencyStage:
    """Alternating timed rounds per grid point, plus fidelity on the same random inputs.

    A decoder exported with past gets its prefill and decode-step points first (``ctx.points``,
    also reported per token); the ``BATCHxSEQUENCE`` grid follows (for such a decoder only when
    ``shapes`` was given).
    """

    name: ClassVar[str] = "latency"

    def run(self, ctx: BenchContext) -> None:
        ctx.random_fidelity = [FidelityAccumulator() for _ in ctx.candidates]
        with ctx.timed():
            self._run(ctx)

    def _run(self, ctx: BenchContext) -> None:
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
        runners = ctx.task_runners
        folders: list[Path | None] = [r.folder or r.path.parent for r in runners]
        tok = TextTokenizer(find_tokenizer(*folders, explicit=opts.tokenizer))
        result: dict[str, Any]
        if ctx.task == "classification":
            result = classification_task(
                runners,
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
            with ctx.timed():  # it reports tokens/s
                result = generation_task(
                    runners,
                    tok,
                    ctx.dataset.texts[: opts.generation_prompts],
                    max_new_tokens=opts.max_new_tokens,
                    max_length=opts.max_length,
                    progress=ctx.progress,
                )
        elif ctx.task == "similarity":
            result = similarity_task(
                runners,
                tok,
                ctx.dataset,
                batch_size=opts.batch_size,
                max_length=opts.max_length,
                fidelity=ctx.data_fidelity,
                progress=ctx.progress,
            )
        else:
            result = perplexity_task(
                runners,
                tok,
                ctx.dataset,
                window=opts.window,
                stride=opts.stride,
                max_windows=opts.max_windows,
                progress=ctx.progress,
            )
        result["data"] = str(ctx.dataset.path)
        result["rows"] = len(ctx.dataset.texts)
        if isinstance(runners[0], ReplayRunner):  # the reference's outputs came from a record
            result["reference_replay"] = runners[0].summary()
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


def _describe(runner: BaseRunner) -> dict[str, Any]:
    info = runner.describe()
    info["inputs"] = [m.to_dict() for m in runner.inputs]
    info["outputs"] = [m.to_dict() for m in runner.outputs]
    if runner.manifest is not None:
        info["manifest"] = runner.manifest
    return info
