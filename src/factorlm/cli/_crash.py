"""Unexpected errors: one line on stderr, the traceback in a log file, exit status 3.

Why: a CI job must tell a bug (3) from a failed goal (1) and a user mistake (2), and a user
should get a file to attach to a bug report rather than a screen of traceback.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import tempfile
import traceback
from pathlib import Path

__all__ = [
    "EXIT_FAILED_GOAL",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_USER",
    "log_dir",
    "write_crash_log",
]

EXIT_OK = 0
EXIT_FAILED_GOAL = 1
EXIT_USER = 2
EXIT_INTERNAL = 3


def log_dir() -> Path:
    """``$FACTORLM_CACHE/logs`` (default ``~/.cache/factorlm/logs``), else a temporary folder."""
    from factorlm._common.files import cache_root

    for candidate in (cache_root() / "logs", Path(tempfile.gettempdir()) / "factorlm-logs"):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    return Path(tempfile.mkdtemp(prefix="factorlm-logs-"))


def write_crash_log(exc: BaseException, argv: list[str] | None) -> Path:
    """Write the traceback, the command line and the library versions; return the file."""
    from factorlm._common.files import versions

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = log_dir()
    fd, name = tempfile.mkstemp(prefix=f"crash-{stamp}-", suffix=".log", dir=folder)
    args = sys.argv[1:] if argv is None else argv
    lines = [
        f"factorlm {' '.join(args)}",
        *(f"{k}: {v}" for k, v in versions().items()),
        "",
        *traceback.format_exception(type(exc), exc, exc.__traceback__),
    ]
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(line.rstrip("\n") for line in lines) + "\n")
    return Path(name)
