"""The ``factorlm`` command: a thin layer over the Python API.

Each stage lives in its own module under ``factorlm.commands`` and registers its subcommand on
the shared Typer app. Errors derived from ``FactorlmError`` become one line and exit status 2.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from factorlm.errors import FactorlmError

__all__ = ["app", "main"]

app = typer.Typer(
    name="factorlm",
    help="Compress transformer models by low-rank factorization and build fast engines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_COMMAND_MODULES = ("assets", "export", "compress", "recover", "build", "bench", "run")

for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"factorlm.commands.{_name}")
    except ModuleNotFoundError as exc:  # a stage not built yet
        if exc.name != f"factorlm.commands.{_name}":
            raise
        continue
    _module.register(app)

_stderr = Console(stderr=True)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show library log messages."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status; user errors print one line and return 2."""
    try:
        app(args=argv, prog_name="factorlm", standalone_mode=True)
    except FactorlmError as exc:
        _stderr.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except SystemExit as exc:  # standalone mode always exits; usage errors exit with 2
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
