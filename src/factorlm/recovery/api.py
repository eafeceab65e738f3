"""``recover``: apply a plan to the PyTorch model, distil it, export it with its factors tagged.

A stage between plan and build: its output folder holds ``model.onnx`` (+ tokenizer, config,
``recovery.json``) ready for ``factorlm build``. Checkpoints live next to it in
``<out>.checkpoints/`` so an interrupted run can ``resume``; the output folder itself is staged
under a temporary name and renamed only once the export validates.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from factorlm._common.outputs import (
    check_output,
    clean_stale,
    external_data_files,
    make_stage,
    mark_owned,
    publish,
)
from factorlm.errors import ConfigError, DataError
from factorlm.options import RecoverOptions, replace
from factorlm.planning import DATA_AWARE, Plan
from factorlm.recovery.apply import apply_plan, load_plan
from factorlm.recovery.train import TrainConfig, train

__all__ = ["RecoveryResult", "checkpoint_dir_for", "recover"]

logger = logging.getLogger(__name__)


@dataclass
class RecoveryResult:
    """The recovered model and what the run did."""

    out_dir: Path
    model: Path
    method: str
    task: str
    steps_done: int
    train_seconds: float
    train_cpu_seconds: float
    stopped: str
    resumed_from: int | None
    final_loss: float | None
    replaced: int
    tagged_factors: int
    max_relative_diff: float
    seconds: dict[str, float] = field(default_factory=dict)
    steps: int = 0  # the schedule's horizon; steps_done < steps when the time budget stopped it
    warning: str | None = None  # why the schedule did not finish (stopped == "time")


def checkpoint_dir_for(out_dir: Path) -> Path:
    """``OUT`` -> ``OUT.checkpoints`` (kept outside the atomically renamed output folder)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}.checkpoints")


def _task_for(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "text-classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "text-generation-with-past"
    return "feature-extraction"


def _needs_stats(plan: Plan) -> str | None:
    for entry in plan.weights.values():
        if entry.method in DATA_AWARE:
            return DATA_AWARE[entry.method]
    return None


def recover(
    model_dir: str | Path,
    plan: Plan | str | Path,
    out_dir: str | Path,
    options: RecoverOptions | None = None,
    *,
    data: str | Path | Sequence[str],
    onnx_model: str | Path | None = None,
    stats: Any = None,
    task: str | None = None,
    resume: bool = False,
    checkpoint_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    **overrides: Any,
) -> RecoveryResult:
    """Recover the accuracy a plan costs by distillation; write ``out_dir/model.onnx``.

    ``options`` (default ``RecoverOptions()``, validated once there; keyword ``overrides``
    replace single fields, e.g. ``steps=50``) say how to train. ``plan`` is a Plan or plan JSON
    keyed by initializer names of ``onnx_model`` (the export the plan was made for; exported
    afresh from ``model_dir`` when None). ``stats`` (CalibrationStats or an .npz path) feeds
    data-aware plans; without it they are computed on the first ``calibration_samples`` texts of
    ``data``, which ``factorlm compress --data DATA`` also uses. ``data`` (a file or a list of
    texts) must hold calibration texts only, never held-out rows.
    """
    import torch

    from factorlm.calibration import CalibrationStats, collect_statistics
    from factorlm.data import read_texts
    from factorlm.exporters.hf import check_model_dir, export, load_torch_model
    from factorlm.recovery.export import export_student

    began = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    opts = options or RecoverOptions()
    if overrides:
        opts = replace(opts, **overrides)
    method, steps, seed = opts.method, opts.steps, opts.seed
    max_samples, calib_samples = opts.max_samples, opts.calibration_samples
    config = check_model_dir(model_dir)
    chosen = load_plan(plan)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else checkpoint_dir_for(out_dir)
    inputs = [
        model_dir,
        None if isinstance(plan, Plan) else Path(plan),
        Path(data) if isinstance(data, str | Path) else None,
        None if onnx_model is None else Path(onnx_model),
        Path(stats) if isinstance(stats, str | Path) else None,
    ]
    inputs += external_data_files(onnx_model) if onnx_model is not None else []
    check_output(out_dir, inputs=inputs, overwrite=overwrite, kind="folder")
    check_output(ckpt, inputs=inputs, overwrite=True, kind="folder", what="checkpoint folder")
    if isinstance(data, str | Path):
        texts = read_texts(Path(data), text_column=opts.text_column, max_samples=max_samples)
    else:
        texts = [t for t in data if isinstance(t, str) and t.strip()][:max_samples]
        if not texts:
            raise DataError("the distillation data holds no non-empty texts.")
    wants = {e.method for e in chosen.weights.values()}
    kinds = {e.kind for e in chosen.weights.values()}
    if method == "kron-kd" and "kron" not in wants:
        raise ConfigError("method 'kron-kd' needs a plan made with --method kron.")
    if method == "safe" and "embedding" not in kinds:
        raise ConfigError(
            "method 'safe' needs a plan that factorizes the token embedding (--embeddings RATIO)."
        )
    task = task or _task_for(config)
    if opts.lm_weight > 0 and not task.startswith("text-generation"):
        raise ConfigError(f"lm_weight needs a causal LM; task {task!r} has no next-token loss.")
    seconds: dict[str, float] = {}

    clean_stale(out_dir.parent, out_dir.name)
    scratch = make_stage(out_dir.parent, out_dir.name, "recover")
    try:
        if onnx_model is None:
            export(model_dir, scratch / "original", task=task, progress=progress)
            onnx_model = scratch / "original" / "model.onnx"
        onnx_model = Path(onnx_model)
        if isinstance(stats, str | Path):
            stats = CalibrationStats.load(Path(stats))
        if stats is None and _needs_stats(chosen) is not None:
            stats = collect_statistics(
                onnx_model, texts[:calib_samples], tokenizer=model_dir,
                max_samples=calib_samples, progress=progress,
            )  # fmt: skip
        seconds["prepare"] = time.perf_counter() - began

        start = time.perf_counter()
        torch.manual_seed(seed)
        teacher = load_torch_model(model_dir, task, False)
        student = load_torch_model(model_dir, task, False)
        applied = apply_plan(student, chosen, onnx_model, stats=stats, safe=method == "safe")
        seconds["apply"] = time.perf_counter() - start

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        cfg = TrainConfig(
            method=method, steps=steps, time_budget_s=opts.time_budget_s,
            batch_size=opts.batch_size, max_length=opts.max_length, lr=opts.lr, seed=seed,
            feature_fraction=opts.feature_fraction, checkpoint_every=opts.checkpoint_every,
            threads=opts.threads, clock=opts.clock, temperature=opts.temperature,
            lm_weight=opts.lm_weight,
        )  # fmt: skip
        result = train(
            student, teacher, tokenizer, texts, cfg, ckpt,
            resume=resume, progress=progress, on_step=on_step,
        )  # fmt: skip
        seconds["train"] = result.seconds

        start = time.perf_counter()
        factors = {
            name: [t.detach().numpy().copy() for t in student.get_submodule(path).factor_tensors()]
            for name, path in applied.modules.items()
        }
        stage = scratch / "out"
        info = export_student(student, model_dir, stage, task, factors)
        record = {
            "method": method,
            "task": task,
            "plan": json.loads(applied.plan.to_json()),
            "train": asdict(cfg),
            "steps_done": result.steps_done,
            "steps": steps,
            "train_seconds": result.seconds,
            "train_cpu_seconds": result.cpu_seconds,
            "stopped": result.stopped,
            "resumed_from": result.resumed_from,
            "warning": result.warning,
            "losses": result.losses[-200:],
            "texts": len(texts),
            **info,
        }
        (stage / "recovery.json").write_text(json.dumps(record, indent=2) + "\n")
        stage.chmod(0o755)
        mark_owned(stage, "recover")
        publish(stage, out_dir)
        seconds["export"] = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("Recovered %s into %s in %.0f s", model_dir, out_dir, time.perf_counter() - began)
    return RecoveryResult(
        out_dir=out_dir,
        model=out_dir / "model.onnx",
        method=method,
        task=task,
        steps_done=result.steps_done,
        train_seconds=result.seconds,
        train_cpu_seconds=result.cpu_seconds,
        stopped=result.stopped,
        resumed_from=result.resumed_from,
        final_loss=result.losses[-1][1] if result.losses else None,
        replaced=len(applied.modules),
        tagged_factors=int(info["tagged_factors"]),
        max_relative_diff=float(info["max_relative_diff"]),
        seconds=seconds,
        steps=steps,
        warning=result.warning,
    )
