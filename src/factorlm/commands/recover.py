"""``factorlm recover MODEL_DIR --plan PLAN.json --data DATA -o OUT``: thin CLI over ``recover``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from factorlm.errors import ConfigError

__all__ = ["parse_duration", "register"]

logger = logging.getLogger(__name__)

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_METHODS = ("distill", "losparse", "dsee", "kron-kd", "safe")
_CLOCKS = ("wall", "cpu")


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
        steps: int = typer.Option(
            500, help="Training steps: the schedule's horizon (warm-up, phase switch, decay)."
        ),
        time_budget: str | None = typer.Option(
            None,
            "--time-budget",
            help="Stop training after this long, e.g. 15m; a hard cap that may cut the schedule.",
        ),
        clock: str = typer.Option(
            "wall",
            metavar="[wall|cpu]",
            help="What --time-budget counts: wall (elapsed) or cpu (process CPU seconds).",
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
        feature_fraction: float = typer.Option(
            0.5, help="Share of steps in feature distillation before output distillation."
        ),
        temperature: float = typer.Option(2.0, help="Temperature of the logit KL."),
        lm_weight: float = typer.Option(
            0.0, help="Causal LM only: weight of the next-token loss added to the KL."
        ),
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
        if clock not in _CLOCKS:
            raise ConfigError(f"--clock {clock!r} is unknown; use one of {', '.join(_CLOCKS)}.")
        if not temperature > 0:
            raise ConfigError(f"--temperature {temperature:g} must be positive.")
        if not lm_weight >= 0:
            raise ConfigError(f"--lm-weight {lm_weight:g} must not be negative.")
        if not 0 <= feature_fraction <= 1:
            raise ConfigError(f"--feature-fraction {feature_fraction:g} must lie in [0, 1].")
        if stats is not None and not stats.is_file():
            raise ConfigError(f"statistics file {stats} does not exist.")
        budget = parse_duration(time_budget) if time_budget is not None else None
        console = Console(stderr=True)
        result = recover(
            model_dir, plan, output, method=method, data=data, steps=steps,
            time_budget_s=budget, clock=clock, seed=seed, onnx_model=onnx_model, stats=stats,
            calib_samples=calib_samples, max_samples=max_samples, text_column=text_column,
            batch_size=batch_size, max_length=max_length, lr=lr,
            feature_fraction=feature_fraction, temperature=temperature, lm_weight=lm_weight,
            checkpoint_every=checkpoint_every, threads=threads, resume=resume, overwrite=overwrite,
            progress=console.is_terminal,
        )  # fmt: skip
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
        Console().print(table)
