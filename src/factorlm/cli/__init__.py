"""The ``factorlm`` command: a thin layer over the Python API, one file per verb.

Exit statuses: 0 every goal passed, 1 a goal failed, 2 a user error (a ``FactorlmError`` or a
usage error: one line), 3 an unexpected error (one line naming a log file with the traceback).
``-v``/``-q`` work before the subcommand and after it; ``--version`` names the libraries.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from factorlm._common.outputs import Terminated, sigterm_as_interrupt, sigterm_received
from factorlm.cli import _output
from factorlm.cli._crash import EXIT_INTERNAL, EXIT_OK, EXIT_USER, write_crash_log
from factorlm.cli._flags import fill_optional_values
from factorlm.errors import FactorlmError

__all__ = ["VERBS", "app", "main", "version_lines"]

logger = logging.getLogger(__name__)

#: Distributions named by ``--version`` (the ONNX Runtime line accepts either wheel).
_VERSION_DISTS = (
    ("factorlm", ("factorlm",)),
    ("onnxruntime", ("onnxruntime", "onnxruntime-gpu")),
    ("onnx", ("onnx",)),
    ("torch", ("torch",)),
    ("transformers", ("transformers",)),
)
#: Optional packages whose absence is the user's to fix (exit 2), not a bug (exit 3).
_INSTALL_HINTS = {
    "onnxruntime": "onnxruntime is not installed; run `pip install 'factorlm[cpu]'` "
    "(or 'factorlm[gpu]' for CUDA).",
    "tensorrt": "TensorRT is not installed; run `pip install 'factorlm[tensorrt]'` on a machine "
    "with an NVIDIA GPU.",
}

VERBS = ("assets", "export", "compress", "recover", "build", "bench", "run", "sweep")

app = _output.FactorlmTyper(
    name="factorlm",
    help="Compress transformer models by low-rank factorization and build fast engines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def version_lines() -> list[str]:
    """``name version`` for factorlm and the libraries it runs on, from package metadata."""
    lines = []
    for label, dists in _VERSION_DISTS:
        found = "not installed"
        for dist in dists:
            try:
                found = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
            if dist != label:
                found += f" ({dist})"
            break
        lines.append(f"{label} {found}")
    return lines


def _print_version(value: bool) -> None:
    if value:
        typer.echo("\n".join(version_lines()))
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help=_output.VERBOSE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_output.QUIET_HELP),
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the versions of factorlm, onnxruntime, onnx, torch and transformers.",
    ),
) -> None:
    _output.set_root_level(verbose, quiet)


for _name in VERBS:
    importlib.import_module(f"factorlm.cli.{_name}").register(app)

_stderr = Console(stderr=True)


def _one_line(text: str) -> str:
    return " ".join(text.split())


#: Typer's (vendored click's) base of usage errors, reached through a public Typer name.
_ClickException: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)


def _error(text: str) -> None:
    _stderr.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def _usage_error(exc: Exception) -> int:
    """A usage error as one line (the help hint included); ``factorlm`` alone prints help."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()  # type: ignore[attr-defined]
        return EXIT_USER
    message = _one_line(exc.format_message())  # type: ignore[attr-defined]
    if ctx is not None:
        message += f" (see `{ctx.command_path} --help`)"
    _error(message)
    return int(getattr(exc, "exit_code", EXIT_USER))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status (never a bare traceback); 143 after SIGTERM."""
    status = _main(argv)
    return 143 if sigterm_received() else status


def _main(argv: list[str] | None = None) -> int:
    _output.reset()
    _output.install_warning_filters()
    try:
        # SIGTERM (CI cancel, timeout) unwinds like Ctrl-C, so staging folders are removed.
        with sigterm_as_interrupt():
            args = fill_optional_values(sys.argv[1:] if argv is None else argv)
            status = app(args=args, prog_name="factorlm", standalone_mode=False)
    except _ClickException as exc:  # usage errors: exit 2
        return _usage_error(exc)
    except typer.Abort as exc:
        return 143 if isinstance(exc.__cause__, Terminated) else 130
    except Terminated:
        return 143
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        return EXIT_USER
    except FactorlmError as exc:
        _error(str(exc))
        return EXIT_USER
    except ModuleNotFoundError as exc:
        hint = _INSTALL_HINTS.get((exc.name or "").split(".")[0])
        if hint is None:
            return _internal_error(exc, argv)
        _error(hint)
        return EXIT_USER
    except Exception as exc:
        return _internal_error(exc, argv)
    return status if isinstance(status, int) else EXIT_OK


def _internal_error(exc: BaseException, argv: list[str] | None) -> int:
    if sigterm_received():  # the interrupt surfaced as another exception (e.g. mid-import)
        return 143
    try:
        where = str(write_crash_log(exc, argv))
    except Exception as log_exc:  # the log itself failed: still one line, never a traceback
        where = f"(no log written: {type(log_exc).__name__}: {log_exc})"
    message = _one_line(f"internal error: {type(exc).__name__}: {exc}; traceback in {where}")
    print(message, file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
