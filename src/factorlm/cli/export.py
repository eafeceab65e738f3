"""``factorlm export``: a Hugging Face model folder to a validated ONNX folder.

Why: every later stage starts from ``model.onnx`` with its tokenizer and config beside it; the
command is a thin layer over :func:`factorlm.exporters.hf.export`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import typer
from rich.table import Table

from factorlm.cli._models import resolve_model
from factorlm.cli._output import console, state
from factorlm.exporters.hf import TASKS

__all__ = ["register"]

ExportTask = Literal[TASKS]  # type: ignore[valid-type]

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the ``export`` subcommand to the CLI."""

    @app.command("export")
    def export(
        model_dir: str = typer.Argument(
            ..., help="Hugging Face model folder, or a model id in the local Hugging Face cache."
        ),
        output: Path = typer.Option(..., "--output", "-o", help="Output folder for model.onnx."),
        task: ExportTask = typer.Option(
            "feature-extraction", "--task", help="What the exported graph computes."
        ),
        opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default: optimum's)."),
        trust_remote_code: bool = typer.Option(
            False, "--trust-remote-code", help="Allow the model folder's own Python code to run."
        ),
        rtol: float = typer.Option(
            1e-3,
            "--rtol",
            help="Max |onnx - torch| allowed, relative to each output's max |torch|.",
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUTPUT."),
    ) -> None:
        """Export MODEL_DIR to ONNX with optimum and validate it against PyTorch."""
        from factorlm.exporters.hf import export as run_export

        result = run_export(
            resolve_model(model_dir),
            output,
            task=task,
            opset=opset,
            trust_remote_code=trust_remote_code,
            rtol=rtol,
            overwrite=overwrite,
            progress=not state.quiet,
        )
        out = console()
        table = Table(title=f"{result.model} ({result.task}, opset {result.opset})")
        table.add_column("output")
        table.add_column("max |onnx - torch|", justify="right")
        table.add_column("scale (max |torch|)", justify="right")
        table.add_column("relative", justify="right")
        for check in result.checks:
            table.add_row(
                check.name,
                f"{check.max_abs_diff:.3g}",
                f"{check.scale:.3g}",
                f"{check.relative:.3g}",
            )
        out.print(table)
        out.print(
            f"Validated: max difference {result.max_abs_diff:.3g} "
            f"({result.max_relative:.2g} of scale, tolerance {result.rtol:g}) in {result.seconds:.1f} s."
        )
