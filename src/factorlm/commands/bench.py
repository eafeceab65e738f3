"""``factorlm bench``: latency and accuracy of candidates against a reference, as a CI gate.

Exit status 0 when every goal passes, 1 when one fails (the report and the console say which and
by how much), 2 on a usage error. The command is a thin layer over
``factorlm.benchmark.run_benchmark``; it adds rich progress bars and a results table.
"""

from __future__ import annotations

import logging
from pathlib import Path

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

from factorlm.benchmark.report import Report

__all__ = ["register"]

logger = logging.getLogger(__name__)

_console = Console(stderr=True)


def _print_summary(report: Report, files: dict[str, Path]) -> None:
    out = Console()
    data = report.data
    table = Table(title="Latency (p50 ms) and speedup vs " + data["reference"]["name"])
    table.add_column("shape")
    table.add_column("model")
    table.add_column("p50 ms", justify="right")
    table.add_column("p90 ms", justify="right")
    table.add_column("speedup [CI]", justify="right")
    for entry in data["latency"]:
        for name, res in entry["results"].items():
            sp = entry["speedup"].get(name)
            speed = f"{sp['estimate']:.3f}x [{sp['ci_low']:.3f}, {sp['ci_high']:.3f}]" if sp else "ref"
            table.add_row(entry["shape"], name, f"{res['p50_ms']:.3f}", f"{res['p90_ms']:.3f}", speed)
    out.print(table)
    task = data.get("task")
    if task:
        unit = "%" if task["drop_unit"] == "percent" else " pts"
        line = ", ".join(
            f"{n} {v:.4g} ({task['drop'][n]:+.3f}{unit})" for n, v in task["candidates"].items()
        )
        out.print(f"{task['task']} {task['metric']}: reference {task['reference']:.4g}; {line}")
    for goal in report.goals:
        mark = "[green]PASS[/]" if goal.passed else "[bold red]FAIL[/]"
        out.print(f"{mark} {goal.candidate} {goal.goal.label}: {goal.detail}", highlight=False)
    out.print(f"Report written to {files['json'].parent}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``bench`` subcommand to the shared app."""

    @app.command("bench")
    def bench(
        reference: str = typer.Option(..., "--reference", "-r", help="Original model: .onnx/.ort/.plan, export folder or engine folder; NAME=PATH names it."),
        candidate: list[str] = typer.Option(..., "--candidate", "-c", help="Model to compare (repeatable); NAME=PATH names it."),
        output: Path = typer.Option(..., "--output", "-o", help="Report folder (report.json/.md/.html, junit.xml)."),
        shapes: list[str] = typer.Option([], "--shapes", "-s", help="BATCHxSEQ grid points, e.g. 1x128 8x128 (repeat or comma-separate); default from the model's axes."),
        data: Path | None = typer.Option(None, "--data", help="Labelled data: JSONL, CSV or TXT."),
        task: str | None = typer.Option(None, "--task", help="classification | perplexity | similarity."),
        tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: the model's folder)."),
        text_column: str = typer.Option("text", "--text-column"),
        label_column: str = typer.Option("label", "--label-column"),
        labels: str | None = typer.Option(None, "--labels", help="Keep only these labels, comma-separated (e.g. fresh,rotten)."),
        max_samples: int = typer.Option(2000, "--max-samples", help="Rows sampled (seeded) from the data; 0 keeps all."),
        skip_rows: int = typer.Option(0, "--skip-rows", help="Skip the data file's first rows (e.g. the calibration rows)."),
        max_length: int = typer.Option(128, "--max-length", help="Tokens per text."),
        window: int = typer.Option(512, "--window", help="Perplexity window in tokens."),
        stride: int | None = typer.Option(None, "--stride", help="Perplexity stride (default: the window)."),
        max_windows: int = typer.Option(8, "--max-windows", help="Perplexity windows scored; 0 = all."),
        goals: Path | None = typer.Option(None, "--goals", help="YAML file of goals."),
        max_accuracy_drop: float | None = typer.Option(None, "--max-accuracy-drop", help="Points (perplexity: percent)."),
        min_speedup: float | None = typer.Option(None, "--min-speedup", help="Minimum median speedup, e.g. 1.5."),
        max_fidelity_loss: float | None = typer.Option(None, "--max-fidelity-loss", help="Maximum 1 - cosine on any output."),
        baseline: Path | None = typer.Option(None, "--baseline", help="Stored report.json to gate latency regressions against."),
        max_regression: str | None = typer.Option(None, "--max-regression", help="Allowed latency regression vs --baseline, e.g. 5 or 5% (default 5%)."),
        regression_basis: str = typer.Option("reference", "--regression-basis", help="reference (candidate/reference ratio) or absolute (ms)."),
        warmup: int = typer.Option(5, "--warmup"),
        iterations: int = typer.Option(30, "--iterations", "-n", help="Alternating rounds per shape."),
        seed: int = typer.Option(0, "--seed"),
        backend: str = typer.Option("auto", "--backend", help="auto | onnxruntime | tensorrt."),
        provider: list[str] = typer.Option([], "--provider", help="ONNX Runtime provider (repeatable)."),
        threads: int = typer.Option(0, "--threads", help="ONNX Runtime intra-op threads; 0 = ORT's default."),
        opt_level: str = typer.Option("all", "--graph-optimization-level", help="disable | basic | extended | layout | all."),
        no_html: bool = typer.Option(False, "--no-html", help="Skip report.html (and matplotlib)."),
    ) -> None:
        """Measure latency and accuracy of candidates against a reference and judge the goals."""
        from factorlm.benchmark.run import run_benchmark

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=_console,
            transient=True,
        ) as bar:
            tasks: dict[str, TaskID] = {}

            def progress(description: str, done: int, total: int) -> None:
                if description not in tasks:
                    tasks[description] = bar.add_task(description, total=total)
                bar.update(tasks[description], completed=done, total=total)

            report = run_benchmark(
                reference,
                candidate,
                shapes=shapes or None,
                data=data,
                task=task,
                goals=goals,
                baseline=baseline,
                max_accuracy_drop=max_accuracy_drop,
                min_speedup=min_speedup,
                max_fidelity_loss=max_fidelity_loss,
                max_regression=max_regression,
                regression_basis=regression_basis,
                warmup=warmup,
                iterations=iterations,
                seed=seed,
                backend=backend,
                providers=provider or None,
                threads=threads,
                graph_optimization_level=opt_level,
                tokenizer=tokenizer,
                text_column=text_column,
                label_column=label_column,
                labels=[x.strip() for x in labels.split(",") if x.strip()] if labels else None,
                max_samples=max_samples or None,
                skip_rows=skip_rows,
                max_length=max_length,
                window=window,
                stride=stride,
                max_windows=max_windows or None,
                progress=progress,
            )
        files = report.write(output, html_report=not no_html)
        _print_summary(report, files)
        if not report.passed:
            raise typer.Exit(1)
