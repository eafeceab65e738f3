"""``factorlm build``: an ONNX model to a deployable engine directory (ONNX Runtime or TensorRT).

Why: the CLI is a thin layer over :func:`factorlm.exporters.engine.build_engine` (ORT or
TensorRT from one ``BuildOptions``); it only checks that the options fit the
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
    data: Path | None = typer.Option(
        None, "--data", help="ORT static int8: calibration texts (JSONL, CSV, TXT or a folder)."
    ),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="ORT static int8: tokenizer folder (default: the model's)."
    ),
    options: BuildOptions = BuildOptions(),
) -> None:
    """Build an ONNX Runtime or TensorRT engine from MODEL into OUTPUT with a manifest."""
    from factorlm.exporters.engine import build_engine

    source = resolve_onnx(model)
    if options.backend == "ort" and timing_cache_file is not None:
        raise ConfigError("--timing-cache-file applies to the tensorrt backend only, not to ort.")
    if options.backend == "tensorrt" and reference_model is not None:
        raise ConfigError("--reference-model applies to the ort backend only, not to tensorrt.")
    if timing_cache_file is not None and not options.timing_cache:
        raise ConfigError("Give either --timing-cache-file or --no-timing-cache, not both.")
    with console(stderr=True).status("building") as status:

        def progress(step: str) -> None:
            status.update(f"{options.backend}: {step}")

        manifest = build_engine(
            source,
            output,
            options,
            reference=reference_model,
            data=data,
            tokenizer=tokenizer,
            timing_cache_file=timing_cache_file,
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
            f" {q.get('method', 'int8')}: {q['quantized']}/{q['weights']} linear weights "
            f"quantized ({q['factor_quantized']}/{q['factor_weights']} factors; "
            f"{q.get('graph_quantized', '?')}/{q.get('graph_weights', '?')} weights in the graph)."
        )
    out.print(line, highlight=False)
    skipped = (manifest.quantization or {}).get("skipped") or {}
    for name, reason in list(skipped.items())[:5]:
        out.print(f"  kept float: {name}: {reason}", highlight=False)
    if len(skipped) > 5:
        out.print(f"  ... and {len(skipped) - 5} more (manifest.json)", highlight=False)
    lost = manifest.extra.get("lost_fusions") if manifest.extra else None
    if lost:
        out.print(f"[yellow]warning:[/] fusions lost against the reference model: {lost}")


def register(app: typer.Typer) -> None:
    """Add the ``build`` subcommand to the CLI."""
    app.command("build")(build_command)
