"""``factorlm compress MODEL -o OUT``: factorize an ONNX model's weights (thin layer over the API).

Every method runs with its defaults: the data-aware ones collect their statistics from
``--data`` (activation Grams / mean |x| through ONNX Runtime; for fwsvd a Fisher from the
PyTorch model's gradients, on the labels or the causal-LM loss). The output is refused when it
exists unless ``--overwrite``, and the input folder's config and tokenizer files are copied
beside it, so the output folder is a model folder the next command (or ``ORTModel``) loads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from factorlm.cli._flags import split_list, with_options
from factorlm.cli._models import resolve_model, resolve_onnx
from factorlm.cli._output import console
from factorlm.distributed import ray_scope
from factorlm.errors import ConfigError, ModelLoadError
from factorlm.options import CompressOptions

__all__ = ["compress_command", "output_paths", "register"]

logger = logging.getLogger(__name__)

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def output_paths(output: Path) -> tuple[Path, Path]:
    """``-o`` as given: a ``.onnx`` file, or a folder that receives ``model.onnx``.

    Returns the ONNX path and the folder the sidecar files go to.
    """
    if output.suffix == ".onnx" and not output.is_dir():
        return output, output.parent
    return output / "model.onnx", output


def _refuse_existing(onnx_path: Path, overwrite: bool) -> None:
    from factorlm.compression import plan_path_for

    existing = [
        p
        for p in (onnx_path, Path(f"{onnx_path}.data"), plan_path_for(onnx_path))
        if p.exists() or p.is_symlink()
    ]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists; pass --overwrite to replace it.")


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(next(folder.glob(p), None) for p in _WEIGHT_PATTERNS)


def _torch_folder(hf_model: str | None, onnx_path: Path, why: str = "method 'fwsvd'") -> Path:
    """The Hugging Face folder whose PyTorch weights ``why`` needs (a Fisher, sampled text).

    ``--hf-model`` if given, else MODEL's folder when it holds the weights, else the source
    folder that ``factorlm export`` recorded beside MODEL (``factorlm-export.json``).
    """
    from factorlm.exporters.hf import export_source

    if hf_model is not None:
        return resolve_model(hf_model, "--hf-model")
    folder = onnx_path.parent
    if _has_weights(folder):
        return folder
    source = export_source(onnx_path)
    if source is not None and _has_weights(source):
        logger.info("PyTorch weights from %s (recorded by factorlm export).", source)
        return source
    found = (
        f"its export record names {source}, which holds none"
        if source is not None
        else "it has no export record (factorlm-export.json)"
    )
    raise ConfigError(
        f"{why} needs the PyTorch weights, which {folder} does not "
        f"hold and {found}: pass --hf-model with the Hugging Face model folder (or cached id) "
        "it was exported from."
    )


def _statistics(
    opts: CompressOptions,
    model: Path,
    data: Path | None,
    stats: Path | None,
    tokenizer: Path | None,
    labels: list[str],
    hf_model: str | None,
) -> Any:
    """Calibration statistics from ``--stats`` or ``--data`` (imported lazily: torch-free path)."""
    need = opts.needs_statistics
    if data is not None and stats is not None:
        raise ConfigError("--data and --stats are alternatives; pass only one of them.")
    if stats is not None:
        from factorlm.calibration import CalibrationStats

        if not stats.is_file():
            raise ConfigError(f"statistics file {stats} does not exist.")
        # mapped, not read, as in the pipeline: compress pages each Gram in when its weight is
        # planned or factorized and hands it back after (``paged_statistics``)
        return CalibrationStats.load(stats, mmap=True)
    if need is None:
        if data is not None:
            logger.warning("--data is not used: method %r needs no calibration data.", opts.method)
        return None
    if data is None:
        raise ConfigError(
            f"method {opts.method!r} needs calibration statistics: pass --data FILE "
            "(JSONL, CSV or TXT), --data mixed (factorlm's mixed-genre set) or --stats STATS.npz."
        )
    from factorlm.calibration.requested import collect_requested

    return collect_requested(
        model,
        data,
        opts,
        torch_folder=lambda why: _torch_folder(hf_model, model, why),
        tokenizer=tokenizer,
        labels=labels or None,
    )


def _run_compress(
    model: Path,
    out: Path,
    opts: CompressOptions,
    stats: Any,
    progress: Any,
    data: Path | None = None,
    tokenizer: Path | None = None,
) -> Any:
    from factorlm.compression import compress

    return compress(
        model, out, opts, stats=stats, progress=progress, data=data, tokenizer=tokenizer
    )


def _copy_sidecars(model: Path, folder: Path, tokenizer: Path | None, overwrite: bool) -> list[str]:
    """Config and tokenizer files of the input (and of ``--tokenizer``) beside the output."""
    from factorlm._common.files import copy_sidecars

    copied: list[str] = []
    for source in (model.parent, tokenizer):
        if source is None or not source.is_dir() or source.resolve() == folder.resolve():
            continue
        copied += copy_sidecars(source, folder, skip_existing=not overwrite or bool(copied))
    return copied


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _table(result: Any) -> Table:
    table = Table(title="factorlm compress", show_header=True)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("after/before", justify="right")

    def row(label: str, before: int, after: int) -> None:
        share = f"{after / before:.3f}" if before else "-"
        table.add_row(label, _fmt(before), _fmt(after), share)

    table.add_row("weights factorized", "", str(result.factorized), "")
    table.add_row("weights left dense", "", str(result.skipped), "")
    row("params (targeted weights)", result.params_before, result.params_after)
    row("FLOPs/token (targeted weights)", result.flops_before, result.flops_after)
    row("params (whole model)", result.model_params_before, result.model_params_after)
    latency = result.plan.latency  # a latency-targeted plan: measured dense vs predicted
    if latency is not None:
        before, after = latency["model_ms"], latency["predicted_ms"]
        table.add_row(
            "latency ms (predicted)", f"{before:.3f}", f"{after:.3f}", f"{after / before:.3f}"
        )
    return table


@with_options(
    CompressOptions,
    hidden_aliases={"calibration_samples": ("--calib-samples", int)},
    short={"ray_address": ("--ray",)},
)
def compress_command(
    model: str = typer.Argument(
        ..., help="Input ONNX model, a folder holding model.onnx, or a cached Hugging Face id."
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Output .onnx file, or a folder that receives model.onnx."
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Calibration data (JSONL, CSV or TXT) for whiten, drone, asvd, fwsvd; 'mixed': "
        "factorlm's mixed-genre set (novels and reviews, from `factorlm assets austen reviews`).",
    ),
    calib: Path | None = typer.Option(None, "--calib", hidden=True),
    stats: Path | None = typer.Option(
        None, "--stats", help="Precomputed calibration statistics (.npz) instead of --data."
    ),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="Tokenizer folder for --data (default: the model's folder)."
    ),
    labels: list[str] = typer.Option(
        [],
        "--labels",
        help="fwsvd: keep only rows with these labels (repeat or comma-separate), e.g. fresh,rotten.",
    ),
    hf_model: str | None = typer.Option(
        None,
        "--hf-model",
        help="fwsvd: Hugging Face folder or cached id with the PyTorch weights MODEL was exported "
        "from (default: MODEL's folder).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    options: CompressOptions = CompressOptions(),
) -> None:
    """Factorize the linear (and embedding) weights of an ONNX model; write OUT and its plan."""
    if calib is not None:
        if data is not None:
            raise ConfigError("--calib is the old name of --data; pass only one of them.")
        data = calib
    source = resolve_onnx(model)
    if not source.is_file():
        raise ModelLoadError(f"The model {source} is not a file.")
    if data is not None:  # "mixed": factorlm's mixed-genre calibration set
        from factorlm._common.files import cache_root
        from factorlm.assets.mixed import resolve_mixed

        data = resolve_mixed(data, cache_root() / "calibration")
    onnx_path, folder = output_paths(output)
    _refuse_existing(onnx_path, overwrite)
    with ray_scope(options.ray_address):  # --ray: calibration and factorization share one Ray
        result = _compress_steps(
            source, onnx_path, options, data, stats, tokenizer, split_list(labels), hf_model
        )
    out = console()
    copied = _copy_sidecars(source, folder, tokenizer, overwrite)
    out.print(_table(result))
    for path in [*result.output_paths, result.plan_path]:
        out.print(f"wrote {path}", highlight=False)
    if copied:
        out.print(f"copied {', '.join(copied)} to {folder}", highlight=False)


def _compress_steps(
    source: Path,
    onnx_path: Path,
    options: CompressOptions,
    data: Path | None,
    stats: Path | None,
    tokenizer: Path | None,
    labels: list[str],
    hf_model: str | None,
) -> Any:
    """Statistics (from ``--stats`` or ``--data``), then the factorization, with a progress bar."""
    calibration = _statistics(options, source, data, stats, tokenizer, labels, hf_model)
    with Progress(
        TextColumn("[bold]factorizing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def progress(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=name)

        return _run_compress(
            source, onnx_path, options, calibration, progress,
            data if options.sequential else None, tokenizer,
        )  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add the ``compress`` subcommand to the factorlm CLI."""
    app.command("compress")(compress_command)
