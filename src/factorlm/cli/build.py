"""``factorlm build``: an ONNX model to a deployable engine directory (ONNX Runtime or TensorRT).

Why: the CLI is a thin layer over :func:`factorlm.exporters.ort.build_ort_engine` and
:func:`factorlm.exporters.tensorrt.build_trt_engine`; it only checks that the options fit the
chosen backend, shows progress and prints what was built.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from factorlm.cli._flags import with_options
from factorlm.cli._models import resolve_onnx
from factorlm.cli._output import console
from factorlm.errors import ConfigError
from factorlm.options import BACKENDS, BuildOptions

__all__ = ["BACKENDS", "build_command", "register"]

logger = logging.getLogger(__name__)


def _summary(manifest: Any) -> Table:
    table = Table(title=f"{manifest.backend} engine: {manifest.engine_path}")
    table.add_column("fused / quantized op")
    table.add_column("source", justify="right")
    table.add_column("engine", justify="right")
    source = manifest.fusions.get("source", {})
    engine = manifest.fusions.get("engine", {})
    for name in sorted(set(source) | set(engine)):
        if source.get(name) or engine.get(name):
            table.add_row(name, str(source.get(name, 0)), str(engine.get(name, "-")))
    return table


@with_options(BuildOptions, short={"backend": ("-b",)}, no_split=("shapes",))
def build_command(
    model: str = typer.Argument(
        ..., help="The .onnx model (original or compressed), or a folder holding model.onnx."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Engine folder to write."),
    reference_model: Path | None = typer.Option(
        None,
        "--reference-model",
        help="ORT: the original model; warn about any fusion the engine lost against it.",
    ),
    timing_cache_file: Path | None = typer.Option(
        None, "--timing-cache-file", help="TensorRT: timing cache file (default: in the cache)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUTPUT."),
    options: BuildOptions = BuildOptions(),
) -> None:
    """Build an ONNX Runtime or TensorRT engine from MODEL into OUTPUT with a manifest."""
    opts = options
    source = resolve_onnx(model)
    if opts.backend == "ort" and timing_cache_file is not None:
        raise ConfigError("--timing-cache-file applies to the tensorrt backend only, not to ort.")
    if opts.backend == "tensorrt" and reference_model is not None:
        raise ConfigError("--reference-model applies to the ort backend only, not to tensorrt.")
    if timing_cache_file is not None and not opts.timing_cache:
        raise ConfigError("Give either --timing-cache-file or --no-timing-cache, not both.")
    with console(stderr=True).status("building") as status:

        def progress(step: str) -> None:
            status.update(f"{opts.backend}: {step}")

        if opts.backend == "ort":
            from factorlm.exporters.ort import build_ort_engine

            manifest = build_ort_engine(
                source,
                output,
                optimize=opts.optimize,
                model_type=opts.model_type,
                fp16=opts.fp16,
                int8=opts.int8,
                int8_weight_type=opts.int8_weight_type,
                format=opts.format,
                providers=list(opts.providers) or None,
                overwrite=overwrite,
                progress=progress,
                fuse_factors=opts.fuse_factors,
                reference=reference_model,
            )
        else:
            from factorlm.exporters.tensorrt import build_trt_engine

            manifest = build_trt_engine(
                source,
                output,
                shapes=list(opts.shapes) or None,
                fp16=opts.fp16,
                bf16=opts.bf16,
                int8=opts.int8,
                calibration=opts.calibration,
                sparse=opts.sparse,
                timing_cache=timing_cache_file if opts.timing_cache else False,
                workspace_gib=opts.workspace_gib,
                overwrite=overwrite,
                progress=progress,
            )
    out = console()
    out.print(_summary(manifest))
    sizes = manifest.sizes
    line = (
        f"Engine {manifest.engine} written to {output}: {sizes['engine_bytes'] / 1e6:.2f} MB "
        f"(source {sizes['source_bytes'] / 1e6:.2f} MB)."
    )
    if manifest.quantization:
        q = manifest.quantization
        line += (
            f" int8: {q['quantized']}/{q['weights']} constant MatMul weights quantized "
            f"({q['factor_quantized']}/{q['factor_weights']} factors)."
        )
    out.print(line, highlight=False)
    lost = manifest.extra.get("lost_fusions") if manifest.extra else None
    if lost:
        out.print(f"[yellow]warning:[/] fusions lost against the reference model: {lost}")


def register(app: typer.Typer) -> None:
    """Add the ``build`` subcommand to the CLI."""
    app.command("build")(build_command)
