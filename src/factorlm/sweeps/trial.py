"""One trial, as it runs on a Ray worker: seed shared stages, run the pipeline, record the result.

Shared stages. Every trial is a ``factorlm run`` into its own folder (``trials/<id>/``), so the
pipeline's output-folder lock and stage cache work unchanged and no two processes ever write the
same folder. Before a trial starts, the stages it shares with an earlier trial (export, data split,
calibration statistics, the original's engine and its recorded task outputs) are copied in from that trial's folder as hard links together with their
manifest entries; the pipeline then finds them under the same stage key and reuses them, or, when
the key differs, replaces them (removing links, never the source files). The source trial has
finished before its followers start (``run.plan_seeds``), so nothing is read while being written.
An ONNX model's external-data file is copied instead: onnx refuses to read one with several links.

Fair latency. A trial holds a node-wide shared lock while it runs, and trades it for the
exclusive lock only around its benchmark's timed sections (``run_pipeline(timing_guard=...)``:
the latency rounds, and generation, which reports tokens/s), so the paired reference/candidate
timing runs with the node's CPUs to itself while the untimed work (compression, engine builds,
task scoring) of several trials overlaps. A waiting timed section blocks new shared holders
(writer preference); a trial already holding it computes on until the end of its current
stage, where it steps aside (``NodeBenchLock.pause``). The lock
files live in the node's temporary folder, keyed by host name, so simulated nodes on one machine
share one lock, as they share its CPUs.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from factorlm._common.files import write_text_atomic
from factorlm._common.outputs import external_data_files, make_stage, remove_owned
from factorlm.pipeline.config import RunConfig, parse_config
from factorlm.pipeline.run import RunResult, run_pipeline
from factorlm.sweeps.select import TrialResult

__all__ = [
    "RESULT_FILE",
    "SHARED_STAGES",
    "NodeBenchLock",
    "read_result",
    "result_from_run",
    "run_trial",
    "seed_stages",
    "write_result",
]

logger = logging.getLogger(__name__)

#: A trial's result, written last: its presence (status done) marks the trial finished.
RESULT_FILE = "trial.json"
#: Stages whose outputs do not depend on the compression settings, reused across trials.
SHARED_STAGES = ("export", "data", "calibrate", "reference", "reference-scores")
_MANIFEST = "manifest.json"  # the pipeline's run manifest (pipeline.artifacts)
_LOG_FILE = "trial.log"
#: A failed job's traceback (a trial, or a sweep's shared job).
ERROR_FILE = "error.log"


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_result(trial_dir: Path) -> TrialResult | None:
    """The stored result of a trial folder (None: it never finished)."""
    data = _read_json(trial_dir / RESULT_FILE)
    if data is None or not isinstance(data.get("id"), str):
        return None
    return TrialResult.from_dict(data)


def write_result(trial_dir: Path, result: TrialResult) -> None:
    trial_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(trial_dir / RESULT_FILE, json.dumps(result.to_dict(), indent=2) + "\n")


def _external_data_files(folder: Path) -> set[str]:
    """The external-data files that the ONNX models in ``folder`` name (absolute paths).

    Why: onnx refuses to read external data from a file with more than one hard link (and from
    a symbolic link), so those files are copied into a trial, never linked.
    """
    return {
        os.path.abspath(data)
        for model in folder.rglob("*.onnx")
        for data in external_data_files(model)
    }


def _link_or_copy(src: str, dst: str, *, copy: bool = False) -> str:
    """Hard-link a file (same filesystem, no bytes copied), else (or when ``copy``) copy it."""
    if os.path.lexists(dst):
        os.unlink(dst)
    if not copy:
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass
    shutil.copy2(src, dst)
    return dst


def seed_stages(source: Path, target: Path, names: tuple[str, ...] = SHARED_STAGES) -> list[str]:
    """Copy (hard-link) the finished stages ``names`` of run folder ``source`` into ``target``,
    with their manifest entries, unless ``target`` already has them. Returns the seeded names."""
    src_manifest = _read_json(source / _MANIFEST)
    if src_manifest is None or not isinstance(src_manifest.get("stages"), dict):
        return []
    target.mkdir(parents=True, exist_ok=True)
    manifest = _read_json(target / _MANIFEST) or {}
    stages = manifest.get("stages")
    if not isinstance(stages, dict):
        stages = {}
    seeded: list[str] = []
    for name in names:
        entry = src_manifest["stages"].get(name)
        folder = source / name
        if not entry or not folder.is_dir() or (name in stages and (target / name).is_dir()):
            continue
        stage = make_stage(target, f"seed-{name}", "sweep")
        external = _external_data_files(folder)

        def place(src: str, dst: str, external: set[str] = external) -> str:
            return _link_or_copy(src, dst, copy=os.path.abspath(src) in external)

        try:
            shutil.copytree(folder, stage, dirs_exist_ok=True, copy_function=place)
            remove_owned(target / name, what="stage folder")
            os.replace(stage, target / name)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        stages[name] = entry
        seeded.append(name)
    if seeded:
        manifest["stages"] = stages
        write_text_atomic(target / _MANIFEST, json.dumps(manifest, indent=2, default=str))
    return seeded


class NodeBenchLock:
    """A writer-preferring reader/writer lock shared by the trials of one host (``fcntl``).

    Compute holds it shared; the benchmark's timed sections hold it exclusively. Without ``fcntl``
    (Windows) it does nothing.
    """

    def __init__(self, folder: Path | None = None) -> None:
        base = folder or Path(tempfile.gettempdir()) / "factorlm-bench-locks"
        with contextlib.suppress(OSError):
            base.mkdir(mode=0o777, parents=True, exist_ok=True)
        host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname())
        self._paths = (base / f"{host}.turnstile", base / f"{host}.rw")
        self._turnstile: IO[str] | None = None
        self._rw: IO[str] | None = None
        self.mode: str | None = None

    def _flock(self, handle: IO[str], op: int) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        fcntl.flock(handle.fileno(), op)

    def _open(self) -> bool:
        if self._rw is None:
            try:
                self._turnstile = self._paths[0].open("a+", encoding="utf-8")
                self._rw = self._paths[1].open("a+", encoding="utf-8")
            except OSError as exc:  # e.g. another user's lock files: time without the lock
                logger.warning("No benchmark lock (%s); latency may be disturbed", exc)
                return False
        return True

    def acquire(self, exclusive: bool) -> float:
        """Take the lock (shared or exclusive); returns the seconds spent waiting."""
        import fcntl

        if not self._open():
            return 0.0
        assert self._turnstile is not None and self._rw is not None
        start = time.perf_counter()
        self._flock(self._turnstile, fcntl.LOCK_EX)  # a waiting benchmark stops new readers
        try:
            self._flock(self._rw, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            self._flock(self._turnstile, fcntl.LOCK_UN)
        self.mode = "exclusive" if exclusive else "shared"
        return time.perf_counter() - start

    def release(self) -> None:
        import fcntl

        if self._rw is not None and self.mode is not None:
            self._flock(self._rw, fcntl.LOCK_UN)
        self.mode = None

    def close(self) -> None:
        self.release()
        for handle in (self._rw, self._turnstile):
            if handle is not None:
                handle.close()
        self._rw = self._turnstile = None

    @contextlib.contextmanager
    def held(self) -> Iterator[NodeBenchLock]:
        """Shared for the block; ``to_exclusive()`` inside it switches before the benchmark."""
        self.acquire(exclusive=False)
        try:
            yield self
        finally:
            self.close()

    def pause(self) -> None:
        """Let a timed section that waits for the node run now, then go on sharing it.

        Why: a benchmark waiting for the exclusive lock would otherwise wait for every other
        trial's compute up to that trial's own timed section or its end (seconds with a core
        idle); trials call this between stages. Nobody waiting: two system calls.
        """
        if self.mode == "shared":
            self.release()
            self.acquire(exclusive=False)  # queues behind a waiting writer (the turnstile)

    def to_exclusive(self) -> float:
        self.release()  # flock upgrades are not atomic: release, then queue as a writer
        return self.acquire(exclusive=True)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[float]:
        """The node to itself for the block (a timed section), shared again after it.

        Yields the seconds spent waiting for the node.
        """
        waited = self.to_exclusive()
        try:
            yield waited
        finally:
            self.release()
            self.acquire(exclusive=False)


def result_from_run(
    trial_id: str, params: Mapping[str, Any], run: RunResult, seconds: float, node: str | None
) -> TrialResult:
    """The trial's figures from the pipeline's benchmark report."""
    report = run.report or {}
    task = report.get("task") or {}
    speedups: dict[str, float] = {}
    for entry in report.get("latency") or []:
        estimate = (entry.get("speedup") or {}).get("compressed", {}).get("estimate")
        if isinstance(estimate, int | float):
            speedups[str(entry.get("shape"))] = float(estimate)
    quality = (task.get("candidates") or {}).get("compressed")
    drop = (task.get("drop") or {}).get("compressed")
    return TrialResult(
        id=trial_id,
        params=dict(params),
        status="done",
        metric=task.get("metric"),
        higher_is_better=task.get("higher_is_better"),
        quality=float(quality) if isinstance(quality, int | float) else None,
        reference_quality=task.get("reference"),
        drop=float(drop) if isinstance(drop, int | float) else None,
        drop_unit=task.get("drop_unit"),
        speedup=min(speedups.values()) if speedups else None,
        speedups=speedups,
        passed=bool(report.get("passed", True)),
        seconds=round(seconds, 2),
        node=node,
        output_dir=str(run.output_dir),
        reused_stages=[s.name for s in run.stages if s.skipped],
    )


def run_on_node(
    run_config: RunConfig,
    console: Console,
    lock_dir: str | None = None,
    *,
    until: str | None = None,
) -> RunResult:
    """``run_pipeline`` as one job of a node shared with other trials.

    It computes holding the node's lock shared, steps aside between stages for a benchmark
    that waits (``NodeBenchLock.pause``), and times its own benchmark with the node to itself.
    """
    lock = NodeBenchLock(Path(lock_dir) if lock_dir else None)
    with lock.held():

        @contextlib.contextmanager
        def timed() -> Iterator[None]:  # latency: the node's CPUs to this job alone
            with lock.exclusive() as waited:
                console.print(f"Benchmark lock taken after {waited:.1f} s")
                yield

        return run_pipeline(
            run_config,
            console=console,
            timing_guard=timed,
            on_stage=lambda _stage: lock.pause(),  # a waiting benchmark goes first
            until=until,
        )


def record_failure(folder: Path, exc: BaseException) -> str:
    """Write the traceback being handled to ``folder/error.log``; return ``exc`` in one line."""
    (folder / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
    return _one_line(exc)


def _freeze_heap() -> None:
    """Collect garbage, then move every surviving object out of the collector's sight.

    Why: a Ray worker runs trial after trial in one process whose heap holds every module the
    pipeline imported (torch, transformers, onnx, ...). Each ``gc.collect`` the pipeline makes to
    hand memory back between stages walks all of it: about 0.1 s each, a second per MiniLM
    trial. What is alive when a trial starts outlives it anyway; the trial's own objects are
    still collected as usual.
    """
    gc.collect()
    gc.freeze()


def run_trial(
    trial_id: str,
    params: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    seed_from: str | None = None,
    node: str | None = None,
    lock_dir: str | None = None,
) -> dict[str, Any]:
    """Run one trial and return its ``TrialResult`` as a dict (also written to ``trial.json``).

    ``config`` is the trial's run config as JSON (absolute paths); ``seed_from`` a finished
    trial folder whose shared stages to reuse. Any error is recorded as a failed result; only an
    interrupt propagates (the trial then has no result file and reruns on resume).
    """
    run_config = parse_config(dict(config), source=f"trial {trial_id}")
    trial_dir = Path(run_config.output_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / RESULT_FILE).unlink(missing_ok=True)
    (trial_dir / ERROR_FILE).unlink(missing_ok=True)
    node = node or socket.gethostname()
    _freeze_heap()
    try:
        start = time.perf_counter()
        with (trial_dir / _LOG_FILE).open("a", encoding="utf-8") as log:
            console = Console(file=log, width=120, force_terminal=False, highlight=False)
            try:
                if seed_from is not None:
                    seeded = seed_stages(Path(seed_from), trial_dir)
                    if seeded:
                        console.print(f"Reusing {', '.join(seeded)} from {seed_from}")
                run = run_on_node(run_config, console, lock_dir)
                result = result_from_run(trial_id, params, run, time.perf_counter() - start, node)
            except Exception as exc:  # recorded, never raised: one failed trial ends no sweep
                error = record_failure(trial_dir, exc)
                console.print(f"Trial failed: {error}")
                result = TrialResult(
                    id=trial_id,
                    params=dict(params),
                    status="failed",
                    error=error,
                    seconds=round(time.perf_counter() - start, 2),
                    node=node,
                    output_dir=str(trial_dir),
                )
    finally:
        gc.unfreeze()  # what the trial left behind is collectable again
    write_result(trial_dir, result)
    return result.to_dict()
