"""factorlm: low-rank factorization of transformer language models, compiled into engines.

The Python API mirrors the CLI one to one, as plain typed functions: ``export``, ``compress``,
``build``, ``benchmark``, ``recover`` and ``run``. Each takes an options object from
``factorlm.options`` (plus keyword overrides of single options) and imports its machinery inside
the function body, so ``import factorlm`` stays cheap (no torch, no onnxruntime until a verb is
used).

``factorlm.benchmark`` is the function; its machinery is the package ``factorlm.bench`` (a
different name, so importing the package never rebinds the function); likewise ``factorlm.sweep``
and the package ``factorlm.sweeps``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factorlm.errors import ConfigError
from factorlm.options import (
    BenchOptions,
    BuildOptions,
    CompressOptions,
    RecoverOptions,
)

if TYPE_CHECKING:
    from factorlm.bench.goals import Goal
    from factorlm.bench.report import Report
    from factorlm.compression import CompressResult
    from factorlm.exporters.hf import ExportResult
    from factorlm.exporters.ort import EngineManifest
    from factorlm.pipeline.config import RunConfig
    from factorlm.pipeline.run import RunResult
    from factorlm.planning import Plan, StatsLike
    from factorlm.recovery.api import RecoveryResult
    from factorlm.sweeps import SweepResult

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
    "generate",
    "recover",
    "run",
    "sweep",
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
    data: PathLike | Sequence[str] | None = None,
    tokenizer: PathLike | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> EngineManifest:
    """Build an engine folder (ONNX Runtime or TensorRT) with a manifest, like ``factorlm build``.

    ``reference`` (ORT): the original model, to warn about a fusion the engine lost against it.
    ``data`` (ORT static int8): calibration texts, a file or a list; ``tokenizer``: its folder
    (default: next to the model).
    """
    from factorlm.exporters.engine import build_engine

    return build_engine(
        model,
        out_dir,
        options,
        reference=reference,
        data=data,
        tokenizer=tokenizer,
        overwrite=overwrite,
        progress=progress,
        **overrides,
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
    from factorlm.bench.run import run_benchmark

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


def generate(
    model: PathLike,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    *,
    tokenizer: PathLike | None = None,
    stop_at_eos: bool = True,
    max_length: int = 1024,
    providers: Sequence[str] | None = None,
    threads: int = 0,
) -> list[str]:
    """Greedy continuations of ``prompts`` by a decoder exported with its KV cache
    (``text-generation-with-past``): an export folder, engine folder or .onnx/.ort file run with
    ONNX Runtime. Returns one text per prompt, without the prompt; stops at the model's EOS token
    unless ``stop_at_eos=False``. Prompts are cut to their first ``max_length`` tokens."""
    from factorlm.bench.generation import generate_texts

    if isinstance(prompts, str):
        raise ConfigError("generate() takes a list of prompts; wrap a single prompt in a list.")
    return generate_texts(
        Path(model),
        list(prompts),
        max_new_tokens=max_new_tokens,
        tokenizer=Path(tokenizer) if tokenizer is not None else None,
        stop_at_eos=stop_at_eos,
        max_length=max_length,
        providers=providers,
        threads=threads,
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
    from factorlm.recovery import recover as _recover

    return _recover(
        Path(model_dir),
        plan if not isinstance(plan, str | os.PathLike) else Path(plan),
        Path(out_dir),
        options,
        data=data if isinstance(data, Sequence) and not isinstance(data, str) else Path(data),
        onnx_model=Path(onnx_model) if onnx_model is not None else None,
        stats=stats,
        task=task,
        resume=resume,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
        overwrite=overwrite,
        progress=progress,
        **overrides,
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


def sweep(
    config: Mapping[str, Any] | PathLike,
    *,
    output_dir: PathLike | None = None,
    address: str | None = None,
    max_concurrent: int | None = None,
    num_cpus: int | None = None,
    retry_failed: bool = False,
) -> SweepResult:
    """Run a sweep like ``factorlm sweep``: every combination of ``axes`` over the ``base`` run
    config as a trial on Ray, then the best trial by the ``select`` rule.

    ``config`` is a sweep YAML path or mapping (relative paths in a mapping resolve against the
    current folder). ``address`` joins an existing Ray cluster (default: a local Ray started for
    the sweep with ``num_cpus`` CPUs); trials already finished in ``output_dir`` are not rerun
    (failed ones are with ``retry_failed``).
    Needs the ``ray`` extra (``pip install 'factorlm[ray]'``).
    """
    from factorlm.sweeps.config import load_sweep, parse_sweep
    from factorlm.sweeps.run import import_ray, run_sweep

    import_ray()  # the missing extra is one sentence before any file is read
    out = Path(output_dir) if output_dir is not None else None
    if isinstance(config, str | os.PathLike):
        resolved = load_sweep(Path(config), output_dir=out)
    elif isinstance(config, Mapping):
        resolved = parse_sweep(dict(config), output_dir=out)
    else:
        raise ConfigError(
            f"config must be a sweep file path or a mapping, not {type(config).__name__}."
        )
    return run_sweep(
        resolved,
        address=address,
        max_concurrent=max_concurrent,
        num_cpus=num_cpus,
        retry_failed=retry_failed,
    )
