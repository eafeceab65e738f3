"""``factorlm run [CONFIG.yaml]``: the whole job, or the embedded default with no config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from factorlm.cli._output import console as make_console
from factorlm.pipeline.config import RunConfig, load_config
from factorlm.pipeline.run import RunResult, run_pipeline

__all__ = ["register"]

logger = logging.getLogger(__name__)


def _fmt_int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _summary(result: RunResult, console: Console) -> None:
    stages = Table(title="Stages", title_justify="left")
    stages.add_column("stage")
    stages.add_column("status")
    stages.add_column("seconds", justify="right")
    stages.add_column("output")
    for stage in result.stages:
        status = "[dim]reused[/]" if stage.skipped else "[green]ran[/]"
        seconds = "-" if stage.skipped else f"{stage.seconds:.1f}"
        stages.add_row(stage.name, status, seconds, str(stage.path))
    console.print(stages)

    compress = result.stage("compress").info
    sizes = Table(title="Compression", title_justify="left")
    for column in ("", "before", "after", "ratio"):
        sizes.add_column(column, justify="right" if column else "left")
    for label, before, after in (
        ("targeted params", compress.get("params_before"), compress.get("params_after")),
        ("FLOPs / token", compress.get("flops_before"), compress.get("flops_after")),
        ("model params", compress.get("model_params_before"), compress.get("model_params_after")),
    ):
        ratio = f"{after / before:.3f}" if before and after is not None else "-"
        sizes.add_row(label, _fmt_int(before), _fmt_int(after), ratio)
    console.print(sizes)

    report = result.report or {}
    latency = Table(
        title="Latency (compressed vs reference, same engine options)", title_justify="left"
    )
    for column in ("shape", "reference p50 ms", "compressed p50 ms", "speedup [95% CI]"):
        latency.add_column(column, justify="left" if column == "shape" else "right")
    for row in report.get("latency", []):
        results = row.get("results", {})
        names = list(results)
        speed: dict[str, float] = next(iter(row.get("speedup", {}).values()), {})
        latency.add_row(
            str(row.get("shape")),
            f"{results[names[0]]['p50_ms']:.2f}" if names else "-",
            f"{results[names[-1]]['p50_ms']:.2f}" if names else "-",
            f"{speed.get('estimate', float('nan')):.2f}x "
            f"[{speed.get('ci_low', float('nan')):.2f}, {speed.get('ci_high', float('nan')):.2f}]",
        )
    console.print(latency)

    task = report.get("task")
    if task:
        accuracy = Table(
            title=f"Task: {task.get('task')} ({task.get('metric')})", title_justify="left"
        )
        accuracy.add_column("model")
        accuracy.add_column("value", justify="right")
        accuracy.add_column("drop", justify="right")
        accuracy.add_column("95 % interval", justify="right")
        accuracy.add_column("agreement", justify="right")
        accuracy.add_row("reference", f"{task.get('reference', float('nan')):.4f}", "", "", "")
        for name, value in task.get("candidates", {}).items():
            drop = task.get("drop", {}).get(name)
            unit = task.get("drop_unit", "")
            span = task.get("drop_interval", {}).get(name)
            agree = task.get("agreement", {}).get(name)
            accuracy.add_row(
                name,
                f"{value:.4f}",
                f"{drop:.2f} {unit}" if drop is not None else "-",
                f"[{span[0]:+.2f}, {span[1]:+.2f}]" if span else "-",
                f"{agree:.3f}" if agree is not None else "-",
            )
        console.print(accuracy)

    for goal in report.get("goals", []):
        mark = "[green]PASS[/]" if goal.get("passed") else "[red]FAIL[/]"
        console.print(f"{mark} {goal.get('type')} {goal.get('value')}: {goal.get('detail', '')}")
    reference, build = result.stage("reference").path, result.stage("build").path
    console.print(f"Engines: {reference}  {build / 'compressed'}")
    console.print(f"Report:  {result.stage('benchmark').path / 'report.md'}")


def run(
    config: Path | None = typer.Argument(
        None, help="YAML config; omitted: the embedded default (all-MiniLM-L6-v2 on reviews)."
    ),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Override output_dir."),
    force: bool = typer.Option(
        False, "--force", help="Rerun every stage instead of reusing cached stage outputs."
    ),
) -> None:
    """Export, calibrate, compress, build engines and benchmark them against the original."""
    run_config = load_config(config) if config is not None else RunConfig()
    if output_dir is not None:
        run_config = run_config.model_copy(update={"output_dir": output_dir})
    console = make_console()
    result = run_pipeline(run_config, console=console, force=force)
    _summary(result, console)
    if not result.passed:
        Console(stderr=True).print("[bold red]A benchmark goal failed.[/]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``run`` subcommand to the factorlm CLI."""
    app.command("run")(run)
