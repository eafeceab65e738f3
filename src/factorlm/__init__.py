"""factorlm: low-rank factorization of transformer language models, compiled into engines.

The Python API mirrors the CLI one to one, as plain typed functions: ``export``, ``compress``,
``build``, ``benchmark``, ``recover`` and ``run``. Each takes an options object from
``factorlm.options`` (plus keyword overrides of single options) and imports its machinery inside
the function body, so ``import factorlm`` stays cheap (no torch, no onnxruntime until a verb is
used).

``factorlm.benchmark`` is the function; the package of the same name stays importable
(``from factorlm.benchmark import run_benchmark``). The import system binds a subpackage to its
parent's attribute whenever it is imported, so this module's class keeps the function there
(``_Package`` below); use ``from factorlm.benchmark import ...`` rather than
``import factorlm.benchmark as ...`` to reach the package.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factorlm.errors import ConfigError
from factorlm.options import (
    BenchOptions,
    BuildOptions,
    CompressOptions,
    RecoverOptions,
    replace,
)

if TYPE_CHECKING:
    from factorlm.benchmark.goals import Goal
    from factorlm.benchmark.report import Report
    from factorlm.compression import CompressResult
    from factorlm.exporters.hf import ExportResult
    from factorlm.exporters.ort import EngineManifest
    from factorlm.pipeline.config import RunConfig
    from factorlm.pipeline.run import RunResult
    from factorlm.planning import Plan, StatsLike
    from factorlm.recovery.api import RecoveryResult

__version__ = "0.1.0"

__all__ = [
    "BenchOptions",
    "BuildOptions",
    "CompressOptions",
    "RecoverOptions",
    "__version__",
    "benchmark",
    "build",
    "compress",
    "export",
    "recover",
    "run",
]

PathLike = str | os.PathLike[str]


def export(
    model_dir: PathLike,
    out_dir: PathLike,
    *,
    task: str = "feature-extraction",
    opset: int | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Export a Hugging Face model folder to ``out_dir/model.onnx`` (+ tokenizer, config), checked
    against PyTorch, like ``factorlm export``."""
    from factorlm.exporters.hf import export as _export

    return _export(
        Path(model_dir),
        Path(out_dir),
        task=task,
        opset=opset,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
    )


def compress(
    model: PathLike,
    output: PathLike,
    options: CompressOptions | None = None,
    *,
    stats: StatsLike | None = None,
    plan: Plan | PathLike | None = None,
    data: PathLike | None = None,
    tokenizer: PathLike | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    **overrides: Any,
) -> CompressResult:
    """Factorize an ONNX model into ``output`` (+ ``<output>.plan.json``), like ``factorlm compress``.

    ``options`` default to ``CompressOptions()`` (whiten, ratio 0.6); keyword ``overrides``
    replace single options, e.g. ``compress(m, out, method="svd", ratio=0.5)``. Data-aware
    methods need ``stats`` or calibration texts in ``data``.
    """
    from factorlm.compression import compress as _compress

    return _compress(
        model,
        output,
        options,
        stats=stats,
        plan=plan,
        data=data,
        tokenizer=tokenizer,
        progress=progress,
        **overrides,
    )


def build(
    model: PathLike,
    out_dir: PathLike,
    options: BuildOptions | None = None,
    *,
    reference: PathLike | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> EngineManifest:
    """Build an engine folder (ONNX Runtime or TensorRT) with a manifest, like ``factorlm build``.

    ``reference`` (ORT): the original model, to warn about a fusion the engine lost against it.
    """
    opts = options or BuildOptions()
    if overrides:
        opts = replace(opts, **overrides)
    if opts.backend == "tensorrt":
        if reference is not None:
            raise ConfigError("build option 'reference' applies to the ort backend only.")
        from factorlm.exporters.tensorrt import build_trt_engine

        return build_trt_engine(
            model,
            out_dir,
            shapes=list(opts.shapes) or None,
            fp16=opts.fp16,
            bf16=opts.bf16,
            int8=opts.int8,
            calibration=opts.calibration,
            sparse=opts.sparse,
            timing_cache=None if opts.timing_cache else False,
            workspace_gib=opts.workspace_gib,
            overwrite=overwrite,
            progress=progress,
        )
    from factorlm.exporters.ort import build_ort_engine

    return build_ort_engine(
        model,
        out_dir,
        optimize=opts.optimize,
        model_type=opts.model_type,
        fp16=opts.fp16,
        int8=opts.int8,
        format=opts.format,
        providers=list(opts.providers) or None,
        int8_weight_type=opts.int8_weight_type,
        fuse_factors=opts.fuse_factors,
        reference=reference,
        overwrite=overwrite,
        progress=progress,
    )


def benchmark(
    reference: PathLike,
    candidates: Sequence[PathLike | tuple[str, PathLike]],
    options: BenchOptions | None = None,
    *,
    data: PathLike | None = None,
    goals: Sequence[Goal] | Mapping[str, Any] | PathLike | None = None,
    baseline: Mapping[str, Any] | PathLike | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    **overrides: Any,
) -> Report:
    """Latency, fidelity, task metric and goals of candidates against a reference, like
    ``factorlm bench``; ``Report.write(folder)`` writes it, ``Report.passed`` gates CI."""
    from factorlm.benchmark.run import run_benchmark

    return run_benchmark(
        Path(reference),
        [(c[0], Path(c[1])) if isinstance(c, tuple) else Path(c) for c in candidates],
        options,
        data=Path(data) if data is not None else None,
        goals=goals if goals is None or isinstance(goals, Sequence | Mapping) else Path(goals),
        baseline=baseline if baseline is None or isinstance(baseline, Mapping) else Path(baseline),
        progress=progress,
        **overrides,
    )


def recover(
    model_dir: PathLike,
    plan: Plan | PathLike,
    out_dir: PathLike,
    options: RecoverOptions | None = None,
    *,
    data: PathLike | Sequence[str],
    onnx_model: PathLike | None = None,
    stats: Any = None,
    task: str | None = None,
    resume: bool = False,
    checkpoint_dir: PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> RecoveryResult:
    """Distil the factorized PyTorch model towards the original and export it, like
    ``factorlm recover``; ``out_dir/model.onnx`` is ready for ``build``."""
    import dataclasses

    from factorlm.recovery import recover as _recover

    opts = options or RecoverOptions()
    if overrides:
        opts = replace(opts, **overrides)
    values = dataclasses.asdict(opts)
    values["calib_samples"] = values.pop("calibration_samples")
    return _recover(
        Path(model_dir),
        plan if not isinstance(plan, str | os.PathLike) else Path(plan),
        Path(out_dir),
        data=data if isinstance(data, Sequence) and not isinstance(data, str) else Path(data),
        onnx_model=Path(onnx_model) if onnx_model is not None else None,
        stats=stats,
        task=task,
        resume=resume,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
        overwrite=overwrite,
        progress=progress,
        **values,
    )


def run(
    config: RunConfig | Mapping[str, Any] | PathLike | None = None,
    *,
    force: bool = False,
    **overrides: Any,
) -> RunResult:
    """Run the whole job like ``factorlm run``: export, calibrate, compress, (recover,) build,
    benchmark.

    ``config`` is None (the embedded default), a YAML path, a mapping or a ``RunConfig``;
    ``overrides`` replace top-level keys (e.g. ``output_dir="out"``); ``force`` reruns every
    stage instead of reusing the cached ones.
    """
    from factorlm.pipeline.config import RunConfig, load_config, parse_config
    from factorlm.pipeline.run import run_pipeline

    if config is None:
        resolved = RunConfig()
    elif isinstance(config, RunConfig):
        resolved = config
    elif isinstance(config, str | os.PathLike):
        resolved = load_config(Path(config))
    elif isinstance(config, Mapping):
        resolved = parse_config(dict(config))
    else:
        raise ConfigError(
            f"config must be a path, a mapping or a RunConfig, not {type(config).__name__}."
        )
    if overrides:
        resolved = parse_config({**resolved.model_dump(mode="json"), **overrides})
    return run_pipeline(resolved, force=force)


class _Package(types.ModuleType):
    """Keeps the API verb ``benchmark`` when the import system binds the subpackage of that name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "benchmark" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
