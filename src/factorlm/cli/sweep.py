"""``factorlm sweep SWEEP.yaml``: a grid of ``factorlm run`` trials on Ray, the best one selected.

Exit status 0 when the selection rule picks a trial (its config is written as ``best.yaml``), 1
when no trial meets the rule, 2 on a user error (bad sweep file, axis not in the run config,
Ray not installed, unreachable cluster). A failed trial is a row in the results, not an exit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

from factorlm.cli._output import console as make_console
from factorlm.sweeps.config import load_sweep
from factorlm.sweeps.run import SweepResult, import_ray, run_sweep

__all__ = ["register", "sweep"]

logger = logging.getLogger(__name__)


def _summary(result: SweepResult, console: Console) -> None:
    ran = len(result.ran)
    failed = sum(not r.ok for r in result.trials)
    console.print(
        f"{len(result.trials)} trials: {ran} run now, {len(result.trials) - ran} resumed, "
        f"{failed} failed."
    )
    for name in ("json", "md", "plot", "best"):
        if name in result.paths:
            console.print(f"{name:>5}: {result.paths[name]}")
    best = result.best
    if best is not None:
        params = ", ".join(f"{k}={v}" for k, v in best.params.items())
        quality = f"{best.metric} {best.quality:.4f}, " if best.quality is not None else ""
        speed = f"{best.speedup:.2f}x" if best.speedup is not None else "-"
        console.print(f"[bold green]Best[/] {best.id}: {params} ({quality}speedup {speed})")


def sweep(
    sweep_file: Path = typer.Argument(
        ..., help="Sweep YAML: base (a run config), axes (run-config key: list of values), select."
    ),
    output_dir: Path | None = typer.Option(
        None, "--output-dir", "-o", help="Folder of the trials and results (overrides output_dir)."
    ),
    address: str | None = typer.Option(
        None,
        "--address",
        help="Join this Ray cluster ('auto', 'ray://head:10001'); default: a local Ray.",
    ),
    max_concurrent: int | None = typer.Option(
        None, "--max-concurrent", min=1, help="Trials in flight at once (default: cluster CPUs)."
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Rerun trials that failed in an earlier run of this sweep."
    ),
) -> None:
    """Run a grid of pipeline configs as trials on Ray and pick the best engine."""
    import_ray()  # one sentence naming the extra before anything else
    config = load_sweep(sweep_file, output_dir=output_dir)
    console = make_console(stderr=True)
    result = run_sweep(
        config,
        console=console,
        address=address,
        max_concurrent=max_concurrent,
        retry_failed=retry_failed,
    )
    _summary(result, make_console())
    if result.best is None:
        Console(stderr=True).print(f"[bold red]{result.selection.reason}[/]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``sweep`` subcommand to the factorlm CLI."""
    app.command("sweep")(sweep)
