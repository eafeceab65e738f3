"""``factorlm compress IN.onnx -o OUT.onnx``: a thin CLI over ``factorlm.compress.compress``."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from factorlm.compress import DEFAULT_MIN_SIZE, CompressResult, compress
from factorlm.decompose.rank import DEFAULT_MIN_FRACTION, STRATEGIES
from factorlm.errors import ConfigError
from factorlm.planning import ALL_METHODS, DATA_AWARE, StatsLike

__all__ = ["register"]

logger = logging.getLogger(__name__)


def _stats(
    model: Path,
    calib: Path | None,
    tokenizer: Path | None,
    text_column: str,
    calib_samples: int,
    stats_path: Path | None,
) -> StatsLike | None:
    """Calibration statistics from ``--stats`` or ``--calib`` (imported lazily: torch-free path)."""
    if calib is not None and stats_path is not None:
        raise ConfigError("--calib and --stats are alternatives; pass only one of them.")
    if stats_path is not None:
        from factorlm.calibration import CalibrationStats

        if not stats_path.is_file():
            raise ConfigError(f"statistics file {stats_path} does not exist.")
        return CalibrationStats.load(stats_path)
    if calib is not None:
        from factorlm.calibration import collect_statistics

        return collect_statistics(
            model, calib, tokenizer=tokenizer, text_column=text_column, max_samples=calib_samples
        )
    return None


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _table(result: CompressResult) -> Table:
    table = Table(title="factorlm compress", show_header=True)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("after/before", justify="right")

    def row(label: str, before: int, after: int) -> None:
        share = f"{after / before:.3f}" if before else "-"
        table.add_row(label, _fmt(before), _fmt(after), share)

    table.add_row("weights factorized", "", str(result.factorized), "")
    table.add_row("weights left dense", "", str(result.skipped), "")
    row("params (targeted weights)", result.params_before, result.params_after)
    row("FLOPs/token (targeted weights)", result.flops_before, result.flops_after)
    row("params (whole model)", result.model_params_before, result.model_params_after)
    return table


def register(app: typer.Typer) -> None:
    """Add the ``compress`` subcommand to the factorlm CLI."""

    @app.command("compress")
    def compress_command(
        model: Path = typer.Argument(..., help="Input ONNX model (never modified)."),
        output: Path = typer.Option(..., "--output", "-o", help="Output ONNX path."),
        method: str = typer.Option("svd", help=f"One of {', '.join(ALL_METHODS)}."),
        ratio: float = typer.Option(0.5, help="Fraction of targeted linear parameters kept."),
        energy: float | None = typer.Option(
            None, help="Keep this spectral energy per weight instead."
        ),
        rank_multiple: int = typer.Option(8, help="Round ranks to this multiple."),
        include: str | None = typer.Option(
            None, help="Regex on initializer or node names to target."
        ),
        exclude: str | None = typer.Option(
            None, help="Regex on initializer or node names to skip."
        ),
        embeddings: float | None = typer.Option(None, help="Parameter ratio for token embeddings."),
        plan: Path | None = typer.Option(
            None, help="Apply this (edited) plan JSON instead of planning."
        ),
        min_size: int = typer.Option(
            DEFAULT_MIN_SIZE, help="Smallest matrix (elements) to factorize."
        ),
        external_data: bool = typer.Option(
            False, "--external-data", help="Write weights to OUT.onnx.data."
        ),
        calib: Path | None = typer.Option(None, help="Calibration texts for data-aware methods."),
        tokenizer: Path | None = typer.Option(None, help="Tokenizer folder for --calib."),
        text_column: str = typer.Option("text", help="Text column of --calib."),
        calib_samples: int = typer.Option(256, help="Calibration samples to use."),
        stats: Path | None = typer.Option(None, help="Precomputed statistics (.npz)."),
        sparse_structure: str = typer.Option(
            "column", help="losparse: column, unstructured or 2:4."
        ),
        sparse_density: float = typer.Option(0.05, help="losparse: density of the sparse part."),
        joint_qkv: bool = typer.Option(
            True,
            "--joint-qkv/--separate-qkv",
            help="Factorize Q/K/V jointly (one shared down-projection) so ORT keeps Attention.",
        ),
        allocation: str = typer.Option(
            "optimal",
            help=f"How --ratio is spread over the weights: one of {', '.join(STRATEGIES)}.",
        ),
        min_fraction: float = typer.Option(
            DEFAULT_MIN_FRACTION,
            help="Floor in [0, 1]: no factorized weight below this fraction of its break-even "
            "rank (lowered when --ratio needs it).",
        ),
    ) -> None:
        """Factorize the linear (and embedding) weights of an ONNX model; write OUT and OUT.plan.json."""
        if method not in ALL_METHODS:
            raise ConfigError(f"method {method!r} is unknown; use one of {', '.join(ALL_METHODS)}.")
        if not 0.0 < ratio < 1.0:
            raise ConfigError(
                f"--ratio {ratio} is out of range: it must be strictly between 0 and 1."
            )
        if allocation not in STRATEGIES:
            raise ConfigError(
                f"--allocation {allocation!r} is unknown; use one of {', '.join(STRATEGIES)}."
            )
        if not 0.0 <= min_fraction <= 1.0:
            raise ConfigError(
                f"--min-fraction {min_fraction} is out of range: it must be between 0 and 1."
            )
        if plan is None and method in DATA_AWARE and calib is None and stats is None:
            raise ConfigError(
                f"method {method!r} needs calibration statistics: pass --calib DATA (with --tokenizer) "
                "or --stats STATS.npz."
            )
        calibration = _stats(model, calib, tokenizer, text_column, calib_samples, stats)
        console = Console()
        with Progress(
            TextColumn("[bold]factorizing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("", total=None)

            def progress(name: str, done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, description=name)

            result = compress(
                model,
                output,
                method=method,
                ratio=ratio,
                energy=energy,
                rank_multiple=rank_multiple,
                include=include,
                exclude=exclude,
                embeddings=embeddings,
                plan=plan,
                min_size=min_size,
                stats=calibration,
                external_data=True if external_data else None,
                sparse_structure=sparse_structure,
                sparse_density=sparse_density,
                joint_qkv=joint_qkv,
                allocation=allocation,
                min_fraction=min_fraction,
                progress=progress,
            )
        console.print(_table(result))
        for path in [*result.output_paths, result.plan_path]:
            console.print(f"wrote {path}")
