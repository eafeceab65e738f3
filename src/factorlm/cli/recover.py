"""``factorlm recover MODEL_DIR --plan PLAN.json --data DATA -o OUT``: thin CLI over ``recover``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from factorlm.cli._flags import with_options
from factorlm.cli._models import resolve_model
from factorlm.cli._output import console
from factorlm.errors import ConfigError
from factorlm.options import RecoverOptions

__all__ = ["parse_duration", "recover_command", "register"]

logger = logging.getLogger(__name__)

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str | float) -> float:
    """``"15m"``, ``"90s"``, ``"1.5h"`` or plain seconds -> seconds (ConfigError otherwise)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", str(text))
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"time budget {text!r} is not a positive duration like 15m, 90s or 1h.")
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


@with_options(
    RecoverOptions,
    hidden_aliases={
        "time_budget_s": ("--time-budget", parse_duration),
        "calibration_samples": ("--calib-samples", int),
    },
    parsers={"time_budget_s": (str | None, parse_duration)},
    help_extra={"time_budget_s": " Seconds, or a duration like 15m, 90s, 1.5h."},
)
def recover_command(
    model_dir: str = typer.Argument(
        ..., help="Hugging Face model folder or cached model id (never modified)."
    ),
    plan: Path = typer.Option(..., "--plan", help="Plan JSON from factorlm compress."),
    data: Path = typer.Option(..., "--data", help="Distillation texts (calibration split only)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (model.onnx ...)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT.checkpoints/."),
    onnx_model: Path | None = typer.Option(
        None, "--onnx", help="The export the plan was made for (default: export afresh)."
    ),
    stats: Path | None = typer.Option(None, "--stats", help="Calibration statistics .npz."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output."),
    options: RecoverOptions = RecoverOptions(),
) -> None:
    """Recover accuracy by distillation; write OUT/model.onnx ready for factorlm build."""
    from factorlm.recovery import recover

    if stats is not None and not stats.is_file():
        raise ConfigError(f"statistics file {stats} does not exist.")
    result = recover(
        resolve_model(model_dir),
        plan,
        output,
        options,
        data=data,
        onnx_model=onnx_model,
        stats=stats,
        resume=resume,
        overwrite=overwrite,
        progress=console(stderr=True).is_terminal,
    )
    table = Table(title="factorlm recover")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("method", result.method)
    table.add_row("steps", f"{result.steps_done}/{result.steps} ({result.stopped})")
    if result.resumed_from is not None:
        table.add_row("resumed from step", str(result.resumed_from))
    table.add_row("training seconds", f"{result.train_seconds:.1f}")
    table.add_row(
        "final loss", f"{result.final_loss:.5f}" if result.final_loss is not None else "-"
    )
    table.add_row("modules factorized", str(result.replaced))
    table.add_row("factor initializers tagged", str(result.tagged_factors))
    table.add_row("export vs PyTorch (relative)", f"{result.max_relative_diff:.2g}")
    table.add_row("model", str(result.model))
    if result.warning is not None:  # also logged; repeated under the table, where it is read
        table.caption = f"[yellow]warning:[/] {escape(result.warning)}"
        table.caption_justify = "left"
    console().print(table)


def register(app: typer.Typer) -> None:
    """Add the ``recover`` subcommand to the factorlm CLI."""
    app.command("recover")(recover_command)
