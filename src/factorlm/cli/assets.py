"""``factorlm assets``: prepare the real models and data into the cache.

Why a subcommand: a fresh machine must get every real asset from one README command, and tests,
benchmarks and the default run then find them with :mod:`factorlm.assets`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.table import Table

from factorlm.assets.paths import ASSET_NAMES, cache_root
from factorlm.cli._output import console, state

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the ``assets`` subcommand to the CLI."""

    @app.command("assets")
    def assets(
        names: list[str] | None = typer.Argument(
            None, help=f"Assets to prepare (default: all): {', '.join(ASSET_NAMES)}."
        ),
        cache: Path | None = typer.Option(
            None, "--cache", help="Cache root (default: $FACTORLM_CACHE or ~/.cache/factorlm)."
        ),
        check: bool = typer.Option(
            False, "--check", help="Re-verify the sha256 of prepared assets; rebuild on mismatch."
        ),
    ) -> None:
        """Prepare real models and data (all-MiniLM-L6-v2, SmolLM2-135M, reviews, Austen)."""
        from factorlm._common.outputs import check_parent
        from factorlm.assets.prepare import prepare

        check_parent(cache_root(cache) / "asset", what="cache folder")  # not a file, writable
        done = prepare(names or None, root=cache, progress=not state.quiet, check=check)
        table = Table(title=f"Assets in {cache_root(cache)}")
        table.add_column("asset")
        table.add_column("path")
        table.add_column("files", justify="right")
        table.add_column("this run")
        for asset in done.values():
            status = "prepared" if asset.built else "already there"
            table.add_row(asset.name, str(asset.path), str(asset.files), status)
        console().print(table)
