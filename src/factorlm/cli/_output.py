"""How loud the CLI is: ``-v``/``-q`` on the root and on every subcommand, consoles, warnings.

Why one module: every verb prints through :func:`console`, so ``-q`` hides progress bars and
tables everywhere, and the third-party warnings a user cannot act on (``torch_dtype`` is
deprecated, TracerWarning, optimum's "Weight deduplication ... requires accelerate") are dropped
in one place unless ``-v`` asks for everything.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import typer
from rich.console import Console

from factorlm.errors import ConfigError

__all__ = [
    "FactorlmTyper",
    "OutputState",
    "configure",
    "console",
    "flag_level",
    "install_warning_filters",
    "reset",
    "set_root_level",
    "state",
]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: Library log messages (logger name, message pattern) that say nothing a user can act on.
QUIET_LOG_MESSAGES: tuple[tuple[str, str], ...] = (
    ("transformers.configuration_utils", r"`?torch_dtype`? is deprecated"),
    ("transformers.modeling_utils", r"`?torch_dtype`? is deprecated"),
    ("optimum.exporters.onnx.base", r"Weight deduplication check .* requires accelerate"),
)
#: ``warnings`` categories (by class name, so torch need not be imported) and message patterns.
QUIET_WARNING_CATEGORIES = frozenset({"TracerWarning"})
VERBOSE_HELP = "More output: -v info logs and library warnings, -vv debug."
QUIET_HELP = "Print only errors and failed goals."
QUIET_WARNING_MESSAGES = (
    r"`?torch_dtype`? is deprecated",
    r"Weight deduplication check .* requires accelerate",
)


@dataclass
class OutputState:
    """The verbosity of this invocation: -1 quiet, 0 normal, 1 ``-v`` (info), 2 ``-vv`` (debug)."""

    level: int = 0

    @property
    def quiet(self) -> bool:
        return self.level < 0

    @property
    def verbose(self) -> bool:
        return self.level > 0


state = OutputState()


def console(*, stderr: bool = False) -> Console:
    """A rich console that ``-q`` silences (results go to stdout, progress to stderr)."""
    return Console(stderr=stderr, quiet=state.quiet)


def flag_level(verbose: int, quiet: bool) -> int:
    """``-v`` count and ``-q`` -> a level; both at once is a user error."""
    if verbose and quiet:
        raise ConfigError("-v/--verbose and -q/--quiet contradict each other; pass only one.")
    return -1 if quiet else min(verbose, 2)


def configure(level: int) -> None:
    """Apply a verbosity level to logging and to the warning filters."""
    state.level = level
    python_level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(python_level[level])
    install_warning_filters()


class _QuietLogFilter(logging.Filter):
    """Drop a library logger's known, unactionable messages unless the user asked for ``-v``."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        if state.verbose:
            return True
        return not self.pattern.search(record.getMessage())


_previous_showwarning = warnings.showwarning
_QUIET_MESSAGE = re.compile("|".join(f"(?:{p})" for p in QUIET_WARNING_MESSAGES))


def _showwarning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    if not state.verbose and (
        category.__name__ in QUIET_WARNING_CATEGORIES or _QUIET_MESSAGE.search(str(message))
    ):
        return
    _previous_showwarning(message, category, filename, lineno, file, line)


_installed = False


def install_warning_filters() -> None:
    """Install the log filters (once) and the ``warnings`` hook; both read :data:`state` live.

    The hook is put back if something (``warnings.catch_warnings``) restored the previous one.
    """
    global _installed, _previous_showwarning
    if not _installed:
        by_logger: dict[str, list[str]] = {}
        for name, pattern in QUIET_LOG_MESSAGES:
            by_logger.setdefault(name, []).append(pattern)
        for name, patterns in by_logger.items():
            logging.getLogger(name).addFilter(_QuietLogFilter(patterns))
        _installed = True
    if warnings.showwarning is not _showwarning:
        _previous_showwarning = warnings.showwarning
        warnings.showwarning = _showwarning


_root = OutputState()


def set_root_level(verbose: int, quiet: bool) -> None:
    """Flags given before the subcommand; the subcommand's own flags combine with them."""
    _root.level = flag_level(verbose, quiet)
    configure(_root.level)


def reset() -> None:
    """Forget the previous invocation's flags (``main`` may run many times in one process)."""
    _root.level = 0
    state.level = 0


def _with_output_flags(func: F) -> F:
    """Give a command ``-v/--verbose`` and ``-q/--quiet`` (configured before the body runs)."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        level = flag_level(kwargs.pop("verbose", 0), kwargs.pop("quiet", False))
        root = _root.level
        if level * root < 0:
            raise ConfigError("-v/--verbose and -q/--quiet contradict each other; pass only one.")
        configure(-1 if min(level, root) < 0 else max(level, root))
        return func(*args, **kwargs)

    extra = [
        inspect.Parameter(
            "verbose",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(0, "--verbose", "-v", count=True, help=VERBOSE_HELP),
            annotation=int,
        ),
        inspect.Parameter(
            "quiet",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
            annotation=bool,
        ),
    ]
    params = list(signature.parameters.values())
    wrapper.__signature__ = signature.replace(parameters=[*params, *extra])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


class FactorlmTyper(typer.Typer):
    """A Typer app whose every command accepts ``-v``/``-q``."""

    def command(self, name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
        register = super().command(name, **kwargs)

        def decorator(func: F) -> F:
            register(_with_output_flags(func))
            return func

        return decorator
