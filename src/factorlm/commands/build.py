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
from rich.console import Console
from rich.table import Table

from factorlm.errors import ConfigError

__all__ = ["BACKENDS", "register"]

logger = logging.getLogger(__name__)

BACKENDS = ("ort", "tensorrt")


def _refuse(backend: str, given: dict[str, bool]) -> None:
    for option, is_set in given.items():
        if is_set:
            raise ConfigError(f"Option {option} does not apply to the {backend} backend.")


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


def register(app: typer.Typer) -> None:
    """Add the ``build`` subcommand to the CLI."""

    @app.command("build")
    def build(
        model: Path = typer.Argument(..., help="The .onnx model (original or compressed)."),
        output: Path = typer.Option(..., "--output", "-o", help="Engine directory to write."),
        backend: str = typer.Option("ort", "--backend", "-b", help="ort | tensorrt"),
        optimize: bool = typer.Option(
            True, "--optimize/--no-optimize", help="ORT: graph and transformer fusions."
        ),
        model_type: str | None = typer.Option(
            None, "--model-type", help="ORT: bert | gpt2 | llama | none (default: detect)."
        ),
        fp16: bool = typer.Option(False, "--fp16", help="Half precision (ORT or TensorRT)."),
        bf16: bool = typer.Option(False, "--bf16", help="TensorRT: allow bfloat16 kernels."),
        int8: bool = typer.Option(
            False, "--int8", help="ORT: dynamic quantization; TensorRT: Q/DQ or --calibration."
        ),
        int8_weight_type: str = typer.Option(
            "uint8", "--int8-weight-type", help="ORT --int8: uint8 (default, safe on AVX2) | int8."
        ),
        engine_format: str = typer.Option("onnx", "--format", help="ORT: onnx | ort (edge)."),
        providers: str | None = typer.Option(
            None, "--providers", help="ORT: comma-separated, e.g. cuda,cpu (default cpu)."
        ),
        shapes: list[str] | None = typer.Option(
            None,
            "--shapes",
            help="TensorRT: name:min,opt,max, e.g. input_ids:1x16,8x128,32x512 (repeatable).",
        ),
        calibration: Path | None = typer.Option(
            None, "--calibration", help="TensorRT: .npz of input arrays for INT8 calibration."
        ),
        sparse: bool = typer.Option(False, "--sparse", help="TensorRT: use 2:4 sparse weights."),
        timing_cache: Path | None = typer.Option(
            None, "--timing-cache", help="TensorRT: timing cache file (default: in the cache)."
        ),
        no_timing_cache: bool = typer.Option(
            False, "--no-timing-cache", help="TensorRT: build without a timing cache."
        ),
        workspace_gib: float | None = typer.Option(
            None, "--workspace-gib", help="TensorRT: workspace memory limit."
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUTPUT."),
        reference_model: Path | None = typer.Option(
            None,
            "--reference-model",
            help="ORT: the original model; warn about any fusion the engine lost against it.",
        ),
        fuse_factors: bool = typer.Option(
            True,
            "--fuse-factors/--no-fuse-factors",
            help="ORT: keep Attention fusions for factorized Q/K/V (fused Attention on x @ L).",
        ),
    ) -> None:
        """Build an ONNX Runtime or TensorRT engine from MODEL into OUTPUT with a manifest."""
        if backend not in BACKENDS:
            raise ConfigError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
        console = Console(stderr=True)
        with console.status("building") as status:

            def progress(step: str) -> None:
                status.update(f"{backend}: {step}")

            if backend == "ort":
                _refuse(
                    "ort",
                    {
                        "--bf16": bf16,
                        "--shapes": bool(shapes),
                        "--calibration": calibration is not None,
                        "--sparse": sparse,
                        "--timing-cache": timing_cache is not None or no_timing_cache,
                        "--workspace-gib": workspace_gib is not None,
                    },
                )
                from factorlm.exporters.ort import build_ort_engine

                manifest = build_ort_engine(
                    model,
                    output,
                    optimize=optimize,
                    model_type=model_type,
                    fp16=fp16,
                    int8=int8,
                    int8_weight_type=int8_weight_type,
                    format=engine_format,
                    providers=providers,
                    overwrite=overwrite,
                    progress=progress,
                    fuse_factors=fuse_factors,
                    reference=reference_model,
                )
            else:
                _refuse(
                    "tensorrt",
                    {
                        "--no-optimize": not optimize,
                        "--model-type": model_type is not None,
                        "--format": engine_format != "onnx",
                        "--providers": providers is not None,
                        "--int8-weight-type": int8_weight_type != "uint8",
                        "--reference-model": reference_model is not None,
                        "--no-fuse-factors": not fuse_factors,
                    },
                )
                if timing_cache is not None and no_timing_cache:
                    raise ConfigError("Give either --timing-cache or --no-timing-cache, not both.")
                from factorlm.exporters.tensorrt import build_trt_engine

                manifest = build_trt_engine(
                    model,
                    output,
                    shapes=shapes,
                    fp16=fp16,
                    bf16=bf16,
                    int8=int8,
                    calibration=calibration,
                    sparse=sparse,
                    timing_cache=False if no_timing_cache else timing_cache,
                    workspace_gib=workspace_gib,
                    overwrite=overwrite,
                    progress=progress,
                )
        out = Console()
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
