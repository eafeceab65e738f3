"""The stages of ``factorlm run``: one plain function each, over the previous stages' folders.

``run.run_pipeline`` decides which stages run and keys their folders; each function here only
reads its inputs and writes into the fresh folder ``out`` it is given, and returns the small
record the run manifest keeps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from rich.console import Console

from factorlm.errors import ConfigError, DataError
from factorlm.options import BenchOptions, BuildOptions, CompressOptions, RecoverOptions, replace
from factorlm.pipeline.config import RunConfig

__all__ = [
    "LATENCY_ONLY",
    "bench_options",
    "benchmark",
    "build_engines",
    "build_reference",
    "calibrate",
    "compress_model",
    "eval_inputs",
    "export_model",
    "predicted_speedup",
    "recover_model",
    "reference_task_settings",
    "resolve_inputs",
    "score_reference",
    "split_data",
]

logger = logging.getLogger(__name__)


def resolve_inputs(config: RunConfig, console: Console) -> tuple[Path, Path]:
    """The model and the labelled data, fetching the embedded defaults when none are given."""
    from factorlm import assets
    from factorlm.assets.prepare import prepare

    wanted = [
        n for n, given in (("minilm", config.model), ("reviews", config.data.path)) if not given
    ]
    if wanted:
        console.print(f"[dim]Preparing default assets: {', '.join(wanted)}[/]")
        prepare(wanted, progress=console.is_terminal)
    model = config.model if config.model is not None else assets.minilm_dir()
    data = config.data.path if config.data.path is not None else assets.reviews_path()
    if not model.exists():
        raise ConfigError(f"Model {model} does not exist.")
    if not data.exists():
        raise DataError(f"Data file {data} does not exist.")
    return model, data


def split_data(config: RunConfig, data: Path, out: Path) -> dict[str, Any]:
    """Disjoint calibration and evaluation files, so nothing is tuned on held-out rows.

    Classification (and other row tasks): the rows are shuffled (seeded), calibration takes the
    first ``calibration_samples``, evaluation the next ``eval_samples``. Perplexity scores running
    text, so its rows (a .txt's non-empty lines) keep their order: calibration is the first
    ``calibration_samples`` rows (the start of the text), evaluation the last ``eval_samples``
    rows (the end of the text, also written as ``eval.txt``, the lines joined by newlines, which
    the benchmark scores); distillation texts are every row before the evaluation slice.
    """
    from factorlm.bench.tasks import task_needs_labels
    from factorlm.data import iter_records, read_labelled, read_texts

    cfg = config.data
    rows: list[dict[str, str]]
    label_column = cfg.label_column
    if label_column and not task_needs_labels(config.benchmark.task):  # labels optional
        label_column = label_column if label_column in next(iter_records(data), {}) else None
    if label_column:
        texts, labels = read_labelled(
            data, text_column=cfg.text_column, label_column=label_column, labels=cfg.labels
        )
        rows = [{"text": t, "label": lab} for t, lab in zip(texts, labels, strict=True)]
    else:
        rows = [{"text": t} for t in read_texts(data, text_column=cfg.text_column)]
    task = config.benchmark.task
    contiguous = task == "perplexity" or (task == "auto" and not label_column)
    need = cfg.calibration_samples + cfg.eval_samples
    if len(rows) < need:
        raise DataError(
            f"{data} has {len(rows)} usable rows; calibration_samples + eval_samples needs {need}."
        )
    if contiguous:
        offset = len(rows) - cfg.eval_samples
        calib, evaluation = rows[: cfg.calibration_samples], rows[offset:]
        train = rows[:offset]  # distillation texts: everything before the evaluation slice
        text = "".join(row["text"] + "\n" for row in evaluation)
        (out / "eval.txt").write_text(text, encoding="utf-8")
    else:
        random.Random(cfg.seed).shuffle(rows)
        offset = cfg.calibration_samples
        calib, evaluation = rows[: cfg.calibration_samples], rows[cfg.calibration_samples : need]
        train = calib + rows[need:]  # distillation texts: everything but the evaluation rows
    for name, part in (
        ("calibration.jsonl", calib),
        ("eval.jsonl", evaluation),
        ("train.jsonl", train),
    ):
        with (out / name).open("w", encoding="utf-8") as handle:
            for row in part:
                handle.write(json.dumps(row) + "\n")
    return {
        "source": str(data),
        "split": "contiguous" if contiguous else "shuffled",
        "calibration_rows": len(calib),
        "eval_rows": len(evaluation),
        "eval_offset": offset if contiguous else None,
        "train_rows": len(train),
    }


def export_model(config: RunConfig, model: Path, out: Path) -> dict[str, Any]:
    from factorlm.exporters.hf import export

    if model.is_file():  # already ONNX: adopt it with its sidecar files
        from factorlm._common.files import copy_sidecars

        shutil.copy2(model, out / "model.onnx")
        copy_sidecars(model, out)  # the checked copy: no symlink out of the model's folder
        return {"source": str(model), "exported": False}
    target = out / "export"
    result = export(
        model,
        target,
        task=config.export.task,
        opset=config.export.opset,
        trust_remote_code=config.export.trust_remote_code,
    )
    _move_up(target, out)
    return {
        "source": str(model),
        "exported": True,
        "opset": result.opset,
        "max_abs_diff": result.max_abs_diff,
        "max_relative_diff": result.max_relative,
    }


def _torch_source(model_dir: Path, why: str) -> Path:
    """The Hugging Face folder with the PyTorch weights (gradients need them)."""
    if model_dir.is_dir():
        return model_dir
    from factorlm.exporters.hf import export_source  # an ONNX model: export recorded its source

    source = export_source(model_dir)
    if source is None or not source.is_dir():
        raise ConfigError(
            f"{why} needs the PyTorch weights: give the Hugging Face model folder as 'model', not "
            f"{model_dir.name}, whose folder has no factorlm-export.json naming an existing "
            "source folder."
        )
    return source


def calibrate(
    config: RunConfig, model_dir: Path, onnx_dir: Path, split: Path, out: Path
) -> dict[str, Any]:
    from factorlm.calibration.requested import collect_requested

    method = config.compress.method
    # the split's columns; everything else as compress reads it from the config
    options = replace(config.options(CompressOptions), text_column="text", label_column="label")
    stats = collect_requested(
        onnx_dir / "model.onnx",
        split / "calibration.jsonl",
        options,
        torch_folder=lambda why: _torch_source(model_dir, why),
        labels=config.data.labels,
    )
    assert stats is not None  # the run calibrates only for a method that needs statistics
    stats.save(out / "stats.npz")
    return {
        "method": method,
        "weights": len(stats.gram) or len(stats.fisher),
        "tokens": stats.tokens,
    }


def _streamable_copy(source: Path, folder: Path) -> Path:
    """``source`` with its weights moved to one external-data file in ``folder``.

    Why: compress reads an external-data model weight by weight from its file and writes its
    output the same way (streaming.py); an inline model would be held whole, checked by a
    second full parse, and serialized whole again. The weights are the same bytes, so the
    compressed model is the same. A model already on external data is used as it is.
    """
    import onnx

    header = onnx.load(str(source), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer):
        return source
    target = folder / source.name
    onnx.save_model(
        header,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=target.name + ".data",
    )
    return target


def compress_model(
    config: RunConfig, onnx_dir: Path, stats_dir: Path | None, out: Path, split: Path
) -> dict[str, Any]:
    import tempfile

    from factorlm._common.files import copy_sidecars
    from factorlm.calibration import CalibrationStats
    from factorlm.compression import compress

    cfg = config.compress
    # mapped, not read: each Gram is paged in when its weight is planned or factorized
    stats = (
        CalibrationStats.load(stats_dir / "stats.npz", mmap=True) if stats_dir is not None else None
    )
    options = config.options(CompressOptions)
    with tempfile.TemporaryDirectory(prefix=".streamed-", dir=out) as scratch:
        source = _streamable_copy(onnx_dir / "model.onnx", Path(scratch))
        if source.parent != onnx_dir:  # the tokenizer, for the sequential refit
            copy_sidecars(onnx_dir / "model.onnx", source.parent)
        result = compress(
            source,
            out / "model.onnx",
            options,
            stats=stats,
            # the sequential refit runs the models again on the calibration texts
            data=split / "calibration.jsonl" if options.sequential else None,
        )
    copy_sidecars(onnx_dir / "model.onnx", out)
    return {
        "method": cfg.method,
        "ratio": cfg.ratio,
        "factorized": result.factorized,
        "skipped": result.skipped,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "flops_before": result.flops_before,
        "flops_after": result.flops_after,
        "model_params_before": result.model_params_before,
        "model_params_after": result.model_params_after,
    }


def recover_model(
    config: RunConfig,
    model_dir: Path,
    onnx_dir: Path,
    compressed_dir: Path,
    stats_dir: Path | None,
    split: Path,
    out: Path,
    checkpoints: Path,
) -> dict[str, Any]:
    from factorlm._common.files import copy_sidecars
    from factorlm.recovery import recover

    cfg = config.recover
    if not model_dir.is_dir():
        raise ConfigError(
            "recover needs the Hugging Face model folder as 'model', not an ONNX file."
        )
    target = out / "recovered"
    result = recover(
        model_dir,
        compressed_dir / "model.plan.json",
        target,
        config.options(RecoverOptions, method=cfg.method or "distill"),
        data=split / "train.jsonl",
        onnx_model=onnx_dir / "model.onnx",
        stats=stats_dir / "stats.npz" if stats_dir is not None else None,
        checkpoint_dir=checkpoints,
        task=config.export.task,
        resume=(checkpoints / "checkpoint.pt").is_file(),
    )
    _move_up(target, out)
    if not (out / "tokenizer.json").exists():
        copy_sidecars(onnx_dir / "model.onnx", out)
    shutil.copy2(compressed_dir / "model.plan.json", out / "model.plan.json")
    return {
        "method": result.method,
        "steps_done": result.steps_done,
        "steps": result.steps,
        "train_seconds": round(result.train_seconds, 1),
        "stopped": result.stopped,
        "warning": result.warning,
        "resumed_from": result.resumed_from,
        "final_loss": result.final_loss,
        "replaced": result.replaced,
    }


def build_reference(config: RunConfig, onnx_dir: Path, split: Path, out: Path) -> dict[str, Any]:
    """The original model's engine, with the candidate's engine options, into ``out`` itself.

    Its own stage, keyed by the export and the build options only, so a run or sweep trial that
    changes only the compression reuses it (and its task record, ``score_reference``).
    """
    from factorlm.exporters.engine import build_engine

    options, data = _engine_options(config, split)
    manifest = build_engine(onnx_dir / "model.onnx", out / "engine", options, data=data)
    _move_up(out / "engine", out)
    return {"engine": manifest.engine, "fusions": manifest.fusions}


def build_engines(
    config: RunConfig,
    onnx_dir: Path,
    reference_dir: Path,
    compressed_dir: Path,
    split: Path,
    out: Path,
) -> dict[str, Any]:
    """The candidate's engine into ``out/compressed`` (the reference's is its own stage)."""
    from factorlm.exporters.engine import build_engine

    options, data = _engine_options(config, split)
    # The lost-fusion check reads the reference engine's own counts, so the reference is not
    # run through ORT's optimizer a second time (gigabytes at BERT-base).
    reference: Path | dict[str, int] | None = None
    if options.backend == "ort":
        fusions = _read_json(reference_dir / "manifest.json").get("fusions") or {}
        reference = fusions.get("optimized") or onnx_dir / "model.onnx"
    manifest = build_engine(
        compressed_dir / "model.onnx", out / "compressed", options, reference=reference, data=data
    )
    return {"compressed": {"engine": manifest.engine, "fusions": manifest.fusions}}


def _engine_options(config: RunConfig, split: Path) -> tuple[BuildOptions, Path | None]:
    """The build options of both engines, and the static int8 calibration rows if any."""
    options = config.options(BuildOptions)
    static = options.backend == "ort" and options.int8 and options.int8_mode == "static"
    data = split / "calibration.jsonl" if static else None  # the compression's calibration rows
    if static:
        options = replace(options, text_column="text")  # the split's column
    return options, data


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def eval_inputs(config: RunConfig, split: Path) -> tuple[BenchOptions, Path]:
    """The benchmark's options and its evaluation file (perplexity: the text's contiguous end)."""
    options = bench_options(config)
    data = split / "eval.jsonl"
    if (split / "eval.txt").is_file():  # perplexity: the contiguous end of the text
        data = split / "eval.txt"
        options = replace(options, label_column=None, labels=None)
    return options, data


#: Benchmark options that only shape latency or goals: the reference's task record ignores them.
LATENCY_ONLY = frozenset(
    {
        "shapes",
        "warmup",
        "iterations",
        "confidence",
        "bootstrap_resamples",
        "prefill_lengths",
        "decode_past",
        "decode_batches",
        "goals_file",
        "max_accuracy_drop",
        "min_speedup",
        "max_fidelity_loss",
        "baseline",
        "max_regression",
        "regression_basis",
    }
)


def reference_task_settings(config: RunConfig, split: Path) -> dict[str, Any]:
    """What the reference's task outputs depend on beyond its engine and the data: every benchmark
    option but the latency/goal ones (an option added later counts until listed)."""
    options, data = eval_inputs(config, split)
    values = dataclasses.asdict(options)
    return {
        "options": {k: v for k, v in values.items() if k not in LATENCY_ONLY},
        "data": data.name,
    }


def score_reference(
    config: RunConfig, reference_dir: Path, split: Path, out: Path
) -> dict[str, Any]:
    """The reference engine's task outputs on the evaluation data, recorded for replay.

    Every run's benchmark answers the reference's task inferences from this record
    (``factorlm.bench.replay``), so trials that share the reference engine score it once.
    """
    from factorlm.bench.run import record_reference

    options, data = eval_inputs(config, split)
    result = record_reference(reference_dir, out, options, data=data)
    task = result.get("task") or {}
    return {"task": task.get("task"), "reference": task.get("reference"), **result["record"]}


def bench_options(config: RunConfig) -> BenchOptions:
    """The benchmark's options: the YAML keys plus the split's columns (``text``, ``label``)."""
    return config.options(
        BenchOptions,
        label_column="label" if config.data.label_column else None,
        labels=tuple(config.data.labels) if config.data.labels is not None else None,
        max_samples=None,
    )


def benchmark(
    config: RunConfig,
    reference_dir: Path,
    build_dir: Path,
    split: Path,
    out: Path,
    record: Path | None = None,
    timing_guard: Callable[[], AbstractContextManager[Any]] | None = None,
) -> dict[str, Any]:
    from factorlm.bench.run import run_benchmark

    options, data = eval_inputs(config, split)
    report = run_benchmark(
        reference_dir,
        [("compressed", build_dir / "compressed")],
        options,
        data=data if options.task != "none" else None,
        reference_record=record,
        timing_guard=timing_guard,
    )
    prediction = predicted_speedup(report.data, "compressed", build_dir / "compressed")
    if prediction is not None:
        report.data["prediction"] = {"compressed": prediction}
    report.write(out)
    return {"passed": report.passed}


def predicted_speedup(
    report: dict[str, Any], candidate: str, engine_dir: Path
) -> dict[str, Any] | None:
    """The plan's predicted speedup (latency-targeted plans) next to the measured one.

    The plan is found beside the ONNX model the engine was built from (its manifest's source);
    the measured speedup is the benchmark's at the plan's ``latency_shape`` (None when that
    shape was not benchmarked). None when the plan has no prediction.
    """
    from factorlm.compression import plan_path_for
    from factorlm.planning import load_plan

    try:
        manifest = json.loads((engine_dir / "manifest.json").read_text(encoding="utf-8"))
        plan_file = plan_path_for(Path(manifest["source"]["path"]))
        latency = load_plan(plan_file).latency if plan_file.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not latency:
        return None
    config = latency.get("config") or {}
    batch, seq, past = (
        int(config.get(key) or default)
        for key, default in (("batch", 1), ("seq", 128), ("past", 0))
    )
    shape = f"decode {batch}x1 past {past}" if past else f"{batch}x{seq}"
    measured = next(
        (
            e["speedup"].get(candidate)
            for e in report.get("latency", [])
            if (
                (e.get("batch"), e.get("seq"), e.get("past") or 0) == (batch, seq, past)
                if "batch" in e
                else e.get("shape") == shape
            )
        ),
        None,
    )
    predicted = float(latency["predicted_speedup"])
    estimate = float(measured["estimate"]) if measured else None
    return {
        "shape": shape,
        "predicted_speedup": predicted,
        "measured_speedup": estimate,
        "ci_low": measured["ci_low"] if measured else None,
        "ci_high": measured["ci_high"] if measured else None,
        "error_pct": 100.0 * (estimate / predicted - 1.0) if estimate is not None else None,
        "predicted_ms": latency["predicted_ms"],
        "model_ms": latency["model_ms"],
    }


def _move_up(target: Path, out: Path) -> None:
    """Move what a library wrote into ``out/<sub>`` up into the stage folder ``out``."""
    for item in target.iterdir():
        shutil.move(str(item), out / item.name)
    target.rmdir()
