"""``factorlm recover MODEL_DIR --plan PLAN.json --data DATA -o OUT``: thin CLI over ``recover``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from factorlm.errors import ConfigError

__all__ = ["parse_duration", "register"]

logger = logging.getLogger(__name__)

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_METHODS = ("distill", "losparse", "dsee", "kron-kd", "safe")


def parse_duration(text: str) -> float:
    """``"15m"``, ``"90s"``, ``"1.5h"`` or plain seconds -> seconds (ConfigError otherwise)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"time budget {text!r} is not a positive duration like 15m, 90s or 1h.")
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


def register(app: typer.Typer) -> None:
    """Add the ``recover`` subcommand to the factorlm CLI."""

    @app.command("recover")
    def recover_command(
        model_dir: Path = typer.Argument(..., help="Hugging Face model folder (never modified)."),
        plan: Path = typer.Option(..., "--plan", help="Plan JSON from factorlm compress."),
        data: Path = typer.Option(
            ..., "--data", help="Distillation texts (calibration split only)."
        ),
        output: Path = typer.Option(..., "--output", "-o", help="Output folder (model.onnx ...)."),
        method: str = typer.Option("distill", help=f"One of {', '.join(_METHODS)}."),
        steps: int = typer.Option(500, help="Training steps (the schedule's length)."),
        time_budget: str | None = typer.Option(
            None, "--time-budget", help="Stop training after this long, e.g. 15m."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue from OUT.checkpoints/."),
        onnx_model: Path | None = typer.Option(
            None, "--onnx", help="The export the plan was made for (default: export afresh)."
        ),
        stats: Path | None = typer.Option(None, "--stats", help="Calibration statistics .npz."),
        calib_samples: int = typer.Option(256, help="Texts for statistics when --stats is absent."),
        max_samples: int | None = typer.Option(None, help="Use at most this many texts."),
        text_column: str = typer.Option("text", help="Text column of --data."),
        batch_size: int = typer.Option(16, help="Texts per step."),
        max_length: int = typer.Option(128, help="Tokens per text."),
        lr: float = typer.Option(1e-4, help="Peak learning rate (AdamW)."),
        seed: int = typer.Option(0, help="Seed of data order and initialisation."),
        checkpoint_every: int = typer.Option(50, help="Steps between checkpoints."),
        threads: int | None = typer.Option(
            None, help="PyTorch threads for training (1 is fastest on a busy CPU)."
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output."),
    ) -> None:
        """Recover accuracy by distillation; write OUT/model.onnx ready for factorlm build."""
        from factorlm.recovery import recover

        if method not in _METHODS:
            raise ConfigError(f"method {method!r} is unknown; use one of {', '.join(_METHODS)}.")
        if stats is not None and not stats.is_file():
            raise ConfigError(f"statistics file {stats} does not exist.")
        budget = parse_duration(time_budget) if time_budget is not None else None
        console = Console(stderr=True)
        result = recover(
            model_dir, plan, output, method=method, data=data, steps=steps,
            time_budget_s=budget, seed=seed, onnx_model=onnx_model, stats=stats,
            calib_samples=calib_samples, max_samples=max_samples, text_column=text_column,
            batch_size=batch_size, max_length=max_length, lr=lr,
            checkpoint_every=checkpoint_every, threads=threads, resume=resume, overwrite=overwrite,
            progress=console.is_terminal,
        )  # fmt: skip
        table = Table(title="factorlm recover")
        table.add_column("")
        table.add_column("value", justify="right")
        table.add_row("method", result.method)
        table.add_row("steps", f"{result.steps_done} ({result.stopped})")
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
        Console().print(table)
