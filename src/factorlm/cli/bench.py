"""``factorlm bench``: latency and accuracy of candidates against a reference, as a CI gate.

Exit status 0 when every goal passes, 1 when one fails (the report and the console say which and
by how much), 2 on a usage error. The command is a thin layer over
``factorlm.bench.run_benchmark``; it adds rich progress bars and a results table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from factorlm.bench.report import Report
from factorlm.cli._flags import split_list, with_options
from factorlm.cli._output import console, state
from factorlm.errors import ConfigError
from factorlm.options import BenchOptions

__all__ = ["bench_command", "register"]

logger = logging.getLogger(__name__)


def _latency_table(data: dict[str, Any]) -> Table:
    """p50/p90 and speedup per shape and model; a decoder's points add ms/token and tokens/s.

    Decoder reports (``tokens`` on every latency entry) are read per token: one decode step of
    batch 4 yields 4 tokens, so its p50 alone does not say how fast the model generates.
    """
    per_token = any("tokens" in entry for entry in data["latency"])
    table = Table(title="Latency (p50 ms) and speedup vs " + data["reference"]["name"])
    table.add_column("shape")
    table.add_column("model")
    for column in ("p50 ms", "p90 ms", *(("ms/token", "tokens/s") if per_token else ())):
        table.add_column(column, justify="right")
    table.add_column("speedup [CI]", justify="right")
    for entry in data["latency"]:
        for name, res in entry["results"].items():
            sp = entry["speedup"].get(name)
            speed = (
                f"{sp['estimate']:.3f}x [{sp['ci_low']:.3f}, {sp['ci_high']:.3f}]" if sp else "ref"
            )
            cells = [entry["shape"], name, f"{res['p50_ms']:.3f}", f"{res['p90_ms']:.3f}"]
            if per_token:
                cells += [
                    _number(res.get("ms_per_token"), ".3f"),
                    _number(res.get("tokens_per_s"), ".1f"),
                ]
            table.add_row(*cells, speed)
    return table


def _number(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _task_lines(task: dict[str, Any], reference: str) -> list[str]:
    """The task's metric per model; generation adds first divergence and end-to-end tokens/s."""
    unit = "%" if task["drop_unit"] == "percent" else " pts"
    line = ", ".join(
        f"{n} {v:.4g} ({task['drop'][n]:+.3f}{unit})" for n, v in task["candidates"].items()
    )
    lines = [f"{task['task']} {task['metric']}: reference {task['reference']:.4g}; {line}"]
    if task["task"] == "generation":
        details = task["details"]
        rates = details.get("tokens_per_s") or {}
        first = details.get("first_divergence_mean") or {}
        speed = ", ".join(
            f"{n} {_number(rates.get(n), '.1f')}" for n in [reference, *task["candidates"]]
        )
        lines.append(f"generation tokens/s (end to end): {speed}")
        lines.append(
            "first differing token (mean position): "
            + ", ".join(f"{n} {_number(first.get(n), '.2f')}" for n in task["candidates"])
        )
    return lines


def _print_summary(report: Report, files: dict[str, Path]) -> None:
    out = console()
    data = report.data
    out.print(_latency_table(data))
    task = data.get("task")
    if task:
        for line in _task_lines(task, data["reference"]["name"]):
            out.print(line, highlight=False)
    failures = Console(stderr=True) if state.quiet else out  # -q still names a failed goal
    for goal in report.goals:
        mark = "[green]PASS[/]" if goal.passed else "[bold red]FAIL[/]"
        line = f"{mark} {goal.candidate} {goal.goal.label}: {goal.detail}"
        if goal.passed:
            out.print(line, highlight=False)
        else:
            failures.print(line, highlight=False)
    out.print(f"Report written to {files['json'].parent}", highlight=False)


def _percent(text: str) -> float:
    """``"5"``, ``"5%"`` or ``"5 %"`` -> 5.0 (percent)."""
    try:
        return float(str(text).strip().rstrip("%").strip())
    except ValueError:
        raise ConfigError(f"--max-regression {text!r} is not a percentage like 5 or 5%.") from None


@with_options(
    BenchOptions,
    short={"shapes": ("-s",), "iterations": ("-n",)},
    hidden_aliases={
        "goals_file": ("--goals", Path),
        "providers": ("--provider", lambda v: tuple(split_list([v]))),
    },
    parsers={"max_regression": (str | None, _percent)},
)
def bench_command(
    reference: str = typer.Option(
        ...,
        "--reference",
        "-r",
        help="Original model: .onnx/.ort/.plan, export folder or engine folder; NAME=PATH names it.",
    ),
    candidate: list[str] = typer.Option(
        ..., "--candidate", "-c", help="Model to compare (repeatable); NAME=PATH names it."
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Report folder (report.json/.md/.html, junit.xml)."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Evaluation data: JSONL, CSV or TXT (labels for classification)."
    ),
    no_html: bool = typer.Option(False, "--no-html", help="Skip report.html (and matplotlib)."),
    options: BenchOptions = BenchOptions(),
) -> None:
    """Measure latency and accuracy of candidates against a reference and judge the goals."""
    from factorlm.bench.run import run_benchmark

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=True,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(description: str, done: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total)
            bar.update(tasks[description], completed=done, total=total)

        report = run_benchmark(reference, candidate, options, data=data, progress=progress)
    files = report.write(output, html_report=not no_html)
    _print_summary(report, files)
    if not report.passed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``bench`` subcommand to the shared app."""
    app.command("bench")(bench_command)
