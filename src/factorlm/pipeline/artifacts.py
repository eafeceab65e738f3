"""Stage outputs as content-addressed folders, so a rerun skips what has not changed.

Each stage writes into a temporary folder next to its final one and renames it on success, then
records ``key`` (a hash of its settings and of its inputs' keys) in ``manifest.json``. A stage is
skipped when the manifest holds the same key and its folder exists. An interrupted stage leaves
only a temporary folder, which the next run deletes, so no corrupt artifact is ever reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ArtifactStore", "StageResult", "hash_files", "hash_json"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"


def hash_json(value: Any) -> str:
    """A stable hash of JSON-able settings (paths become strings, keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


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
        for stale in root.glob(f"{_TMP_PREFIX}*"):
            logger.info("Removing %s left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
        self._manifest = self._read_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"stages": {}}
        return data if isinstance(data.get("stages"), dict) else {"stages": {}}

    def _write_manifest(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=_TMP_PREFIX, suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self._manifest, handle, indent=2, default=str)
        os.replace(tmp, self.root / MANIFEST)

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
    ) -> StageResult:
        """Run ``build(tmp_dir)`` unless an identical stage output exists; publish atomically."""
        hit = self.cached(name, key)
        if hit is not None:
            logger.info("Stage %s unchanged; reusing %s", name, hit.path)
            return hit
        final = self.root / name
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f"{_TMP_PREFIX}{name}-"))
        start = time.perf_counter()
        try:
            info = build(tmp) or {}
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.perf_counter() - start
        self._manifest["stages"][name] = {"key": key, "seconds": round(seconds, 3), "info": info}
        self._write_manifest()
        return StageResult(name, key, final, seconds, False, info)
