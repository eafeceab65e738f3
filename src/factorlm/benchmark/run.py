"""``run_benchmark``: latency, fidelity, task metrics and goals of candidates against a reference.

The order of work is chosen so that every usage error (unknown goal, missing labels, unreadable
baseline, models that do not match) surfaces before the first timed inference, and the slow parts
(latency rounds, task data) report progress through one callback.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from factorlm.benchmark.accuracy import FidelityAccumulator
from factorlm.benchmark.feeds import Shape, default_shapes, make_feeds, parse_shapes, vocab_size_of
from factorlm.benchmark.goals import Goal, evaluate_goals, goals_from_options, load_goals
from factorlm.benchmark.latency import (
    environment_info,
    latency_summary,
    measure_alternating,
    speedup_interval,
)
from factorlm.benchmark.report import SCHEMA, SCHEMA_VERSION, Report, load_report
from factorlm.benchmark.runners import BaseRunner, TensorMeta, load_runner
from factorlm.benchmark.tasks import (
    TASKS,
    check_dataset,
    classification_task,
    load_dataset,
    load_tokenizer,
    perplexity_task,
    similarity_task,
)
from factorlm.errors import ConfigError

__all__ = ["DEFAULT_MAX_REGRESSION", "Progress", "parse_model_arg", "run_benchmark"]

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


def run_benchmark(
    reference: str | Path,
    candidates: Sequence[str | Path | tuple[str, str | Path]],
    *,
    shapes: Sequence[str | Shape] | None = None,
    data: str | Path | None = None,
    task: str | None = None,
    goals: Sequence[Goal] | Path | str | Mapping[str, Any] | None = None,
    baseline: str | Path | Mapping[str, Any] | None = None,
    max_accuracy_drop: float | None = None,
    min_speedup: float | None = None,
    max_fidelity_loss: float | None = None,
    max_regression: float | str | None = None,
    regression_basis: str = "reference",
    warmup: int = 5,
    iterations: int = 30,
    seed: int = 0,
    confidence: float = 0.95,
    backend: str = "auto",
    providers: Sequence[str] | None = None,
    threads: int = 0,
    graph_optimization_level: str = "all",
    tokenizer: str | Path | None = None,
    text_column: str = "text",
    label_column: str | None = "label",
    labels: Sequence[str] | None = None,
    max_samples: int | None = 2000,
    skip_rows: int = 0,
    test_fraction: float = 0.2,
    max_length: int = 128,
    batch_size: int = 32,
    window: int = 512,
    stride: int | None = None,
    max_windows: int | None = 8,
    progress: Progress | None = None,
) -> Report:
    """Benchmark ``candidates`` against ``reference`` and judge the goals.

    Models are paths (file, export folder or engine folder) or ``NAME=PATH``. Goals come from
    ``goals`` (list, mapping or YAML path) plus the keyword shortcuts; a ``baseline`` without an
    explicit ``max_regression`` gates at 5 %. Raises ``FactorlmError`` subclasses on usage errors.
    """
    if not candidates:
        raise ConfigError("Give at least one candidate model to compare with the reference.")
    if iterations < 3:
        raise ConfigError(f"Iterations must be at least 3, not {iterations}.")
    if warmup < 0:
        raise ConfigError(f"Warm-up rounds must be non-negative, not {warmup}.")
    if regression_basis not in ("reference", "absolute"):
        raise ConfigError(f"Regression basis {regression_basis!r} is not reference or absolute.")
    if not 0.5 <= confidence < 1.0:
        raise ConfigError(f"Confidence {confidence} must lie in [0.5, 1).")
    task = None if task in (None, "none") else task
    goal_list = _resolve_goals(goals) + goals_from_options(
        max_accuracy_drop=max_accuracy_drop,
        min_speedup=min_speedup,
        max_fidelity_loss=max_fidelity_loss,
        max_regression=max_regression,
    )
    baseline_data: Mapping[str, Any] | None = None
    if baseline is not None:
        baseline_data = baseline if isinstance(baseline, Mapping) else load_report(Path(baseline))
        if not any(g.type == "max-regression" for g in goal_list):
            goal_list.append(Goal("max-regression", DEFAULT_MAX_REGRESSION))
    if any(g.type == "max-regression" for g in goal_list) and baseline_data is None:
        raise ConfigError("Goal max-regression needs a baseline report (--baseline report.json).")
    if task is not None and task not in TASKS:
        raise ConfigError(f"Task {task!r} is not one of {', '.join(TASKS)}.")
    if task is not None and data is None:
        raise ConfigError(f"Task {task} needs a data file (--data).")
    if data is not None and task is None:
        raise ConfigError("A data file needs a task (--task classification|perplexity|similarity).")
    if any(g.type == "max-accuracy-drop" for g in goal_list) and task is None:
        raise ConfigError("Goal max-accuracy-drop needs labelled data (--data and --task).")
    dataset = None
    if data is not None and task is not None:
        dataset = load_dataset(
            Path(data),
            text_column=text_column,
            label_column=label_column,
            labels=labels,
            limit=max_samples if task != "perplexity" else None,
            seed=seed,
            skip_rows=skip_rows,
        )
        check_dataset(dataset, task)
    grid = parse_shapes(shapes) if shapes else None

    parsed = [parse_model_arg(reference)] + [parse_model_arg(c) for c in candidates]
    runners = [
        load_runner(
            path,
            name=name,
            backend=backend,
            providers=providers,
            intra_op_threads=threads,
            graph_optimization_level=graph_optimization_level,
        )
        for name, path in parsed
    ]
    for runner, name in zip(runners, _unique_names([r.name for r in runners]), strict=True):
        runner.name = name

    feed_rng, boot_rng, order_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    with ExitStack() as stack:
        for runner in runners:
            stack.enter_context(runner)
        ref, cands = runners[0], runners[1:]
        for cand in cands:
            _check_match(ref, cand)
        grid = grid or default_shapes(ref.inputs)
        vocab = vocab_size_of(ref.path) or vocab_size_of(Path(parsed[0][1]) / "model.onnx")
        random_fidelity = [FidelityAccumulator() for _ in cands]
        latency: list[dict[str, Any]] = []
        for shape in grid:
            feeds = make_feeds(ref.inputs, shape, rng=feed_rng, vocab_size=vocab)
            outputs = [r.infer(feeds) for r in runners]
            mask = feeds.get("attention_mask")
            for acc, out in zip(random_fidelity, outputs[1:], strict=True):
                acc.add(outputs[0], out, mask)

            def tick(i: int, label: str = shape.label) -> None:
                if progress is not None:
                    progress(f"latency {label}", i + 1, iterations)

            times = measure_alternating(
                runners, feeds, warmup=warmup, iterations=iterations, rng=order_rng, on_iteration=tick
            )
            entry: dict[str, Any] = {
                "shape": shape.label,
                "batch": shape.batch,
                "seq": shape.seq,
                "results": {r.name: latency_summary(times[:, k], shape.batch) for k, r in enumerate(runners)},
                "speedup": {
                    r.name: speedup_interval(
                        times[:, 0], times[:, k], rng=boot_rng, confidence=confidence
                    ).to_dict()
                    for k, r in enumerate(runners)
                    if k > 0
                },
            }
            latency.append(entry)
            logger.info(
                "%s: %s",
                shape.label,
                ", ".join(f"{n} p50 {v['p50_ms']:.3f} ms" for n, v in entry["results"].items()),
            )

        task_result = None
        data_fidelity = [FidelityAccumulator() for _ in cands]
        if dataset is not None and task is not None:
            folders: list[Path | None] = [r.folder or r.path.parent for r in runners]
            tok = load_tokenizer(folders, Path(tokenizer) if tokenizer else None)
            if task == "classification":
                task_result = classification_task(
                    runners, tok, dataset, seed=seed, test_fraction=test_fraction,
                    batch_size=batch_size, max_length=max_length, fidelity=data_fidelity,
                    progress=progress,
                )
            elif task == "similarity":
                task_result = similarity_task(
                    runners, tok, dataset, batch_size=batch_size, max_length=max_length,
                    fidelity=data_fidelity, progress=progress,
                )
            else:
                task_result = perplexity_task(
                    runners, tok, dataset, window=window, stride=stride,
                    max_windows=max_windows, progress=progress,
                )
            task_result["data"] = str(dataset.path)
            task_result["rows"] = len(dataset.texts)

        fidelity: dict[str, Any] = {}
        for cand, rnd, real in zip(cands, random_fidelity, data_fidelity, strict=True):
            on_data = bool(real.outputs)
            fidelity[cand.name] = {
                "inputs": "data" if on_data else "random",
                "outputs": real.result() if on_data else rnd.result(),
                "random": rnd.result(),
            }
        described = [_describe(r) for r in runners]

    data_dict: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment_info(),
        "settings": {
            "shapes": [s.label for s in grid],
            "warmup": warmup,
            "iterations": iterations,
            "seed": seed,
            "confidence": confidence,
            "task": task,
            "data": str(data) if data is not None else None,
            "labels": list(labels) if labels is not None else None,
            "max_samples": max_samples,
            "skip_rows": skip_rows,
            "max_length": max_length,
            "regression_basis": regression_basis,
            "baseline": str(baseline) if isinstance(baseline, str | Path) else None,
            "vocab_size": vocab,
        },
        "reference": described[0],
        "candidates": described[1:],
        "latency": latency,
        "fidelity": fidelity,
        "task": task_result,
    }
    results = evaluate_goals(
        goal_list, data_dict, baseline=baseline_data, regression_basis=regression_basis, rng=boot_rng
    )
    return Report(data_dict, results)


def _describe(runner: BaseRunner) -> dict[str, Any]:
    info = runner.describe()
    info["inputs"] = [m.to_dict() for m in runner.inputs]
    info["outputs"] = [m.to_dict() for m in runner.outputs]
    if runner.manifest is not None:
        info["manifest"] = runner.manifest
    return info
