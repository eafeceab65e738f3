"""One checked way to create an output: refuse what would harm an input, own what we write.

Why: factorlm runs unattended (CI, build servers) on paths a user typed. Before any expensive
work, :func:`check_output` refuses an output that is an input, contains one or lies inside an
input folder, whose parent is a file, or that sits in a read-only place. Every folder factorlm creates
carries an own-marker file (:data:`MARKER`, JSON naming the command), so ``--overwrite`` and
``factorlm run`` delete only folders that factorlm wrote (:func:`remove_owned`). Staging folders
carry the same marker with the writing process id, so the next run recognizes the stage of a
killed run (:func:`clean_stale`) and removes it without touching a concurrent run's. SIGTERM (a CI
cancel, ``timeout``) is turned into an interrupt (:func:`sigterm_as_interrupt`) so the same
``finally`` blocks that clean up after Ctrl-C run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from factorlm.errors import ConfigError

__all__ = [
    "MARKER",
    "Terminated",
    "check_output",
    "check_parent",
    "clean_stale",
    "external_data_files",
    "is_owned",
    "make_stage",
    "mark_owned",
    "publish",
    "read_marker",
    "remove_owned",
    "remove_stage",
    "sigterm_as_interrupt",
    "sigterm_received",
    "staged_output",
]

logger = logging.getLogger(__name__)

#: The own-marker file in every folder factorlm creates (JSON: tool, command, pid, host, time).
MARKER = ".factorlm-owned"
_TOOL = "factorlm"


_RECEIVED = False


def sigterm_received() -> bool:
    """Whether SIGTERM arrived during the last :func:`sigterm_as_interrupt` block (a library may
    turn the interrupt into another exception, e.g. ImportError mid-import)."""
    return _RECEIVED


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwinds like Ctrl-C so staging folders are removed on the way out."""


def _record(command: str) -> dict[str, Any]:
    return {
        "tool": _TOOL,
        "command": command,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def mark_owned(folder: str | os.PathLike[str], command: str) -> Path:
    """Write the own-marker into ``folder`` (write-then-rename, so it is never half-written)."""
    folder = Path(folder)
    fd, tmp = tempfile.mkstemp(prefix=f"{MARKER}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(_record(command), handle)
            handle.write("\n")
        os.replace(tmp, folder / MARKER)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / MARKER


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of ``folder`` when it is a valid factorlm marker (a regular file), else None."""
    path = Path(folder) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        if path.stat().st_size > 4096:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == _TOOL else None


def is_owned(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a real folder (not a symlink) that factorlm created."""
    folder = Path(folder)
    return folder.is_dir() and not folder.is_symlink() and read_marker(folder) is not None


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _writable_ancestor(out: Path, what: str) -> Path:
    """The nearest existing ancestor of ``out``: a folder we may create entries in."""
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ConfigError(
                    f"{what} {out} cannot be created: {parent} is a file, not a folder."
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{what} {out} cannot be created: {parent} is not writable.")
            return parent
    return Path(out.anchor or ".")


def check_parent(out: str | os.PathLike[str], what: str = "output") -> None:
    """ConfigError when ``out`` cannot be created: an ancestor is a file or not writable."""
    _writable_ancestor(Path(out).absolute(), what)


def check_output(
    out: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    overwrite: bool = False,
    kind: str = "folder",
    what: str = "output",
    companions: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Refuse, in one sentence (ConfigError), an output that would harm an input or cannot be made.

    Checked up front, before any expensive work:

    - the output (or a ``companions`` file written with it, e.g. ``OUT.onnx.data``) is one of
      ``inputs``, or (a folder output) is, contains, or lies inside an input folder, or contains
      an input file;
    - its parent is a file, or the nearest existing folder is not writable;
    - ``kind="folder"``: it exists as a file, or as a non-empty folder without ``overwrite``,
      or as a non-empty folder that factorlm did not create (no :data:`MARKER`), even with
      ``overwrite``;
    - ``kind="file"``: it exists as a folder, or as a file without ``overwrite``.

    ``inputs`` are the files and folders the command reads (None entries are skipped).
    """
    out = Path(out)
    if str(out) in ("", "."):
        out = Path(os.getcwd())
    resolved = _resolved(out.absolute())
    _writable_ancestor(out.absolute(), what)
    targets = [resolved, *(_resolved(Path(c).absolute()) for c in companions)]
    for item in inputs:
        if item is None:
            continue
        src = Path(item)
        real = _resolved(src.absolute())
        for target in targets:
            if target == real or _same_file(target, real):
                raise ConfigError(
                    f"{what} {target} is the input {src}; choose another path so the input is "
                    "not overwritten."
                )
        if kind == "folder":
            if real.is_relative_to(resolved):
                raise ConfigError(
                    f"{what} folder {out} contains the input {src}; choose another -o so the "
                    "input is not overwritten."
                )
            if src.is_dir() and resolved.is_relative_to(real):
                raise ConfigError(
                    f"{what} folder {out} lies inside the input folder {src}; choose a path "
                    "outside it."
                )
    if kind == "folder":
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{what} {out} exists and is a file, not a folder.")
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise ConfigError(
                    f"{what} {out} already exists and is not empty; pass --overwrite."
                )
            if not is_owned(out):
                raise ConfigError(
                    f"{what} {out} was not created by factorlm (no {MARKER} file in it), so "
                    "--overwrite will not delete it; remove it yourself or choose another -o."
                )
        if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {out} is not writable.")
    else:
        if out.is_dir():
            raise ConfigError(f"{what} {out} is a folder; give a file path.")
        if out.exists() and not overwrite:
            raise ConfigError(f"{what} {out} already exists; pass --overwrite to replace it.")
        for companion in companions:
            path = Path(companion)
            if path.is_dir():
                raise ConfigError(f"{what} {path} is a folder; it would be written as a file.")
    return out


def remove_owned(path: str | os.PathLike[str], *, what: str = "folder") -> None:
    """Delete ``path`` only if factorlm created it (or it is an empty folder); else ConfigError."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        raise ConfigError(
            f"{what} {path} is not a folder factorlm created; remove it yourself or choose "
            "another path."
        )
    if not path.exists():
        return
    if any(path.iterdir()) and not is_owned(path):
        raise ConfigError(
            f"{what} {path} was not created by factorlm (no {MARKER} file in it); remove it "
            "yourself or choose another output folder."
        )
    shutil.rmtree(path)


def make_stage(parent: str | os.PathLike[str], name: str, command: str) -> Path:
    """A marked, empty hidden folder ``.<name>.<random>.tmp`` in ``parent`` (same filesystem as
    the final output, so publishing it is one rename); :func:`clean_stale` recognizes it."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        stage.chmod(0o777 & ~umask)  # mkdtemp makes it private; outputs are shared
        mark_owned(stage, command)
    except BaseException:  # a SIGTERM (Terminated) right here must not leave the stage behind
        remove_stage(stage)
        raise
    return stage


def remove_stage(stage: str | os.PathLike[str] | None) -> None:
    """Delete a stage folder, even when a SIGTERM (:class:`Terminated`) interrupts the deletion.

    Why: a signal that lands inside ``shutil.rmtree`` stops it half way; the handler ignores
    further SIGTERMs, so the second pass always completes before the interrupt propagates.
    """
    if stage is None:
        return
    try:
        shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def publish(
    stage: str | os.PathLike[str], out: str | os.PathLike[str], *, owned_only: bool = True
) -> Path:
    """Rename a finished ``stage`` to ``out``; an existing ``out`` (checked as ours up front) is
    moved aside first and deleted after, so ``out`` is at every moment absent, old or new.

    ``owned_only=False`` also replaces a non-empty folder without :data:`MARKER` (for callers
    that checked ``out`` themselves, e.g. an asset cache folder from before the marker)."""
    stage, out = Path(stage), Path(out)
    old: Path | None = None
    try:
        if out.exists() or out.is_symlink():
            checked = owned_only and out.is_dir() and not out.is_symlink()
            if checked and any(out.iterdir()) and not is_owned(out):
                raise ConfigError(
                    f"output {out} was not created by factorlm (no {MARKER} file in it); "
                    "remove it yourself or choose another -o."
                )
            old = make_stage(out.parent, out.name, "replaced")
            os.replace(out, old / out.name)
        os.replace(stage, out)
    except BaseException:
        if old is not None and not out.exists() and (old / out.name).exists():
            os.replace(old / out.name, out)  # put the previous output back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def staged_output(
    out: str | os.PathLike[str], command: str, *, owned_only: bool = True
) -> Iterator[Path]:
    """Yield a marked stage next to ``out``; publish it as ``out`` on success, delete it on any
    exception (KeyboardInterrupt and :class:`Terminated` included). Stale stages of killed runs
    for the same ``out`` are removed first. ``owned_only`` as in :func:`publish`."""
    out = Path(out)
    clean_stale(out.parent, out.name)
    stage = make_stage(out.parent, out.name, command)
    try:
        yield stage
        publish(stage, out, owned_only=owned_only)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _alive(record: dict[str, Any]) -> bool:
    """Whether the process that wrote ``record`` may still run (unknown counts as alive)."""
    if record.get("host") != socket.gethostname():
        return True
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale(parent: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Remove stages of killed runs in ``parent``: hidden folders (``.<name>.*`` when ``name``
    is given) that carry a factorlm marker whose process is gone. Returns what was removed;
    folders without a marker, or of a live process, are never touched."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(name)}\..+" if name else r"^\..+")
    removed = []
    for entry in parent.iterdir():
        if not pattern.match(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        record = read_marker(entry)
        if record is None or _alive(record):
            continue
        logger.info("Removing %s left by an interrupted run (pid %s)", entry, record.get("pid"))
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _mentions_location(path: Path) -> bool:
    """Whether the bytes ``location`` occur in the file: a tensor on external data names its
    file under that key, serialized as is, so a file without them has none (and need not be
    parsed: an inline model of 100 MB takes a quarter second to parse, once per trial in a sweep).
    """
    import mmap

    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(b"location") >= 0
    except (OSError, ValueError):  # unreadable or empty: let the parser decide
        return True


def external_data_files(model: str | os.PathLike[str]) -> list[Path]:
    """The external-data files an ONNX file refers to (existing ones), without loading them.

    A compress output must never be written over these: its ``.data`` file may have the very
    name an input's weights live under.
    """
    import onnx

    path = Path(model)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file() or not _mentions_location(path):
        return []
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception:
        return []
    found: set[Path] = set()
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location":
                candidate = path.parent / entry.value
                if candidate.is_file():
                    found.add(candidate)
    return sorted(found)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt), so cleanup in
    ``finally``/``except BaseException`` runs as on Ctrl-C. Only in the main thread; restores
    the previous handler on exit."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: FrameType | None) -> None:
        global _RECEIVED
        _RECEIVED = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut cleanup
        raise Terminated

    global _RECEIVED
    _RECEIVED = False
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
