"""Stage outputs as content-addressed folders, so a rerun skips what has not changed.

Each stage writes into a temporary folder next to its final one and renames it on success, then
records ``key`` (a hash of its settings and of its inputs' keys) in ``manifest.json``. A stage is
skipped when the manifest holds the same key and its folder exists. An interrupted stage leaves
only a temporary folder, which the next run deletes, so no corrupt artifact is ever reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factorlm._common.files import exclusive_lock, sha256_bytes, write_text_atomic
from factorlm._common.outputs import (
    MARKER,
    check_parent,
    clean_stale,
    is_owned,
    make_stage,
    mark_owned,
    publish,
    remove_owned,
)
from factorlm.errors import ConfigError

__all__ = [
    "LOCK_NAME",
    "ArtifactStore",
    "StageResult",
    "hash_files",
    "hash_json",
    "lock_output_dir",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"
#: Held (``fcntl.flock``) by the run that owns the output folder.
LOCK_NAME = ".factorlm.lock"


#: What ``factorlm run`` owns inside output_dir (besides manifest.json, the lock file and its
#: hidden ``.tmp-*`` stages): one folder per stage and the recover checkpoints.
STAGE_FOLDERS = (
    "export",
    "data",
    "calibrate",
    "compress",
    "recover",
    "reference",
    "reference-scores",
    "build",
    "benchmark",
)


def check_run_folder(root: Path) -> None:
    """Refuse, before anything is created, an output_dir that is a file or that holds a stage
    folder factorlm did not write (a user's ``data/`` or ``build/``): run would replace it."""
    check_parent(root, "output_dir")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output_dir {root} is a file, not a folder.")
    if not root.is_dir():
        return
    names = [*STAGE_FOLDERS, *(p.name for p in root.glob("recover-checkpoints-*"))]
    for name in names:
        folder = root / name
        if folder.is_symlink() or folder.is_file():
            raise ConfigError(
                f"output_dir {root} holds {name!r}, which is not a folder factorlm wrote; "
                "move it away or choose another output_dir."
            )
        if folder.is_dir() and any(folder.iterdir()) and not is_owned(folder):
            raise ConfigError(
                f"output_dir {root} holds a {name}/ folder that factorlm did not write (no "
                f"{MARKER} in it); move it away or choose another output_dir."
            )


@contextlib.contextmanager
def lock_output_dir(root: Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``root`` for the block; refuse at once if another run holds it.

    The lock is taken before anything in the folder is read or removed, so a second run on the
    same folder never deletes the first run's temporary folders. The lock file stays (removing
    it would race with a waiting run); the operating system releases the lock when the process
    ends, even on SIGKILL. Where ``fcntl`` is missing (Windows) the run is not locked.
    """
    check_run_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    busy = (
        f"Output folder {root} is in use by another factorlm run; wait for it to "
        "finish or choose another output_dir."
    )
    with exclusive_lock(root / LOCK_NAME, busy) as path:
        yield path


def hash_json(value: Any) -> str:
    """A stable hash of JSON-able settings (paths become strings, keys sorted)."""
    return sha256_bytes(json.dumps(value, sort_keys=True, default=str, separators=(",", ":")))


def hash_files(paths: Iterable[Path]) -> str:
    """Hash the bytes of files (folders recursively, in sorted order) with their relative names."""
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            digest.update(str(path.relative_to(root) if root.is_dir() else path.name).encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


@dataclass
class StageResult:
    """What one stage produced and whether it was reused from an earlier run."""

    name: str
    key: str
    path: Path
    seconds: float
    skipped: bool
    info: dict[str, Any] = field(default_factory=dict)


class ArtifactStore:
    """The run's output folder: one subfolder per stage plus ``manifest.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        clean_stale(root)  # only marked stages whose process is gone
        self._manifest = self._read_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"stages": {}}
        return data if isinstance(data.get("stages"), dict) else {"stages": {}}

    def _write_manifest(self) -> None:
        write_text_atomic(self.root / MANIFEST, json.dumps(self._manifest, indent=2, default=str))

    def update_header(self, values: Mapping[str, Any]) -> None:
        """Record run-level facts (versions, config) next to the stage entries."""
        self._manifest.update(values)
        self._write_manifest()

    def cached(self, name: str, key: str) -> StageResult | None:
        entry = self._manifest["stages"].get(name)
        path = self.root / name
        if entry and entry.get("key") == key and path.is_dir():
            return StageResult(name, key, path, 0.0, True, dict(entry.get("info", {})))
        return None

    def run(
        self,
        name: str,
        key: str,
        build: Callable[[Path], dict[str, Any] | None],
        *,
        force: bool = False,
    ) -> StageResult:
        """Run ``build(tmp_dir)`` unless an identical stage output exists (or ``force``); publish
        atomically."""
        hit = None if force else self.cached(name, key)
        if hit is not None:
            logger.info("Stage %s unchanged; reusing %s", name, hit.path)
            return hit
        final = self.root / name
        tmp = make_stage(self.root, f"{_TMP_PREFIX[1:]}{name}", "run")
        start = time.perf_counter()
        try:
            info = build(tmp) or {}
            mark_owned(tmp, "run")  # the stage may have replaced its contents
            if final.is_symlink() or final.is_file():
                remove_owned(final, what="stage folder")  # not ours: refuses in one sentence
            publish(tmp, final)  # the previous artifact is moved aside, put back on failure
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.perf_counter() - start
        self._manifest["stages"][name] = {"key": key, "seconds": round(seconds, 3), "info": info}
        self._write_manifest()
        return StageResult(name, key, final, seconds, False, info)
