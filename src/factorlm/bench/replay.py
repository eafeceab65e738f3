"""The reference engine's task outputs, recorded once and replayed, so trials stop re-scoring it.

Why: in a sweep every trial benchmarks its candidate against the same reference engine on the
same evaluation data, and scoring the reference (embedding every row, perplexity windows) is
half the task stage. ``record_reference`` runs the task on the reference alone and keeps every
output of every inference, filed under a digest of its exact feeds (names, dtypes, shapes,
bytes). ``ReplayRunner`` then answers the task stage's inferences from that record: a feed it
holds gives the recorded outputs, any other feed runs the real engine. A replay therefore never
answers a question the reference was not asked, whatever the settings, and gives the very bytes
the engine gave. The record is only valid for the engine that made it; the pipeline keys it by
the reference engine's stage key (``factorlm.pipeline``). Latency never replays: it times the
real sessions, paired per run; nor does the generation task, which reports every engine's
tokens/s (``UNREPLAYED_TASKS``).

Layout of a record folder: ``index.json`` (digest -> output names and files) and one ``.npy``
per output under ``outputs/``. Recording stops adding outputs past ``budget_bytes`` (the rest run
live at replay time), so a decoder's vocabulary-wide logits cannot fill the disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from factorlm.bench.runners import BaseRunner, TensorMeta

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "INDEX",
    "UNREPLAYED_TASKS",
    "RecordingRunner",
    "ReplayRunner",
    "feeds_digest",
    "load_record",
]

logger = logging.getLogger(__name__)

INDEX = "index.json"
_OUTPUTS = "outputs"
#: Tasks whose reference is always run live: they time it.
UNREPLAYED_TASKS = frozenset({"generation"})
#: Most output bytes one record keeps (the rest of the inferences run live when replayed).
DEFAULT_BUDGET_BYTES = 256 << 20


def feeds_digest(feeds: Mapping[str, np.ndarray]) -> str:
    """A digest of the exact feeds: input names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(feeds):
        value = np.ascontiguousarray(feeds[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class _Wrapped(BaseRunner):
    """A runner in front of an open runner: same name, files and tensors."""

    def __init__(self, inner: BaseRunner) -> None:
        super().__init__(inner.path, inner.name)
        self.inner = inner
        self.backend = inner.backend
        self.folder = inner.folder
        self.manifest = inner.manifest
        self._active = True  # the inner runner's session is what is open

    @property
    def inputs(self) -> tuple[TensorMeta, ...]:
        return self.inner.inputs

    @property
    def outputs(self) -> tuple[TensorMeta, ...]:
        return self.inner.outputs

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


class RecordingRunner(_Wrapped):
    """Runs the real engine and writes each inference's outputs into ``folder`` (a record)."""

    def __init__(
        self, inner: BaseRunner, folder: Path, *, budget_bytes: int = DEFAULT_BUDGET_BYTES
    ) -> None:
        super().__init__(inner)
        self.record = Path(folder)
        (self.record / _OUTPUTS).mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self.index: dict[str, dict[str, str]] = {}
        self.bytes = 0
        self.skipped = 0  # inferences past the budget, not recorded

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.inner.infer(feeds)
        key = feeds_digest(feeds)
        size = sum(np.asarray(v).nbytes for v in outputs.values())
        if key in self.index:
            return outputs
        if self.bytes + size > self.budget_bytes:
            self.skipped += 1
            return outputs
        files: dict[str, str] = {}
        for k, (name, value) in enumerate(outputs.items()):
            rel = f"{_OUTPUTS}/{len(self.index):06d}-{k}.npy"
            np.save(self.record / rel, np.asarray(value), allow_pickle=False)
            files[name] = rel
        self.index[key] = files
        self.bytes += size
        return outputs

    def close(self) -> dict[str, Any]:
        """Write the index; returns what the record holds."""
        (self.record / INDEX).write_text(json.dumps(self.index, indent=1), encoding="utf-8")
        info = {"inferences": len(self.index), "bytes": self.bytes, "not_recorded": self.skipped}
        logger.info("Recorded %s reference inferences (%s bytes)", len(self.index), self.bytes)
        return info


def load_record(folder: Path) -> dict[str, dict[str, str]]:
    """A record's index (digest -> output name -> file), or an empty one when it has none."""
    try:
        data = json.loads((Path(folder) / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class ReplayRunner(_Wrapped):
    """Answers from a record where it holds the exact feeds, else from the real engine."""

    def __init__(self, inner: BaseRunner, folder: Path) -> None:
        super().__init__(inner)
        self.record = Path(folder)
        self.index = load_record(self.record)
        self.hits = 0
        self.misses = 0

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        files = self.index.get(feeds_digest(feeds))
        if files is not None:
            try:
                outputs = {
                    name: np.load(self.record / rel, allow_pickle=False)
                    for name, rel in files.items()
                }
            except (OSError, ValueError) as exc:  # a damaged record: run the engine instead
                logger.warning("Reference record unreadable (%s); running the engine", exc)
            else:
                self.hits += 1
                return outputs
        self.misses += 1
        return self.inner.infer(feeds)

    def summary(self) -> dict[str, Any]:
        return {"record": str(self.record), "replayed": self.hits, "ran": self.misses}
