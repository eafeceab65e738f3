"""Run a sweep's trials on Ray: a local Ray by default, or an existing cluster by address.

Each trial is one Ray task (``trial.run_trial``) holding ``cpus_per_trial`` CPUs; the driver
only schedules, shows a live table and writes the results. The stages trials share (export,
data, the original's engine and its task outputs) run first, once per input group, as a job of
their own (``shared.plan_shared``); the group's trials start from its folder, and trials that
share a calibration wait for the first of them (``plan_seeds``). A trial whose
``trials/<id>/trial.json`` says done is not run again, so an interrupted sweep resumes where it
stopped: trials with a result file are skipped (failed ones too, unless ``retry_failed``).
Trial folders must be on storage every node sees (one machine, or a shared filesystem on a
cluster), like the model and data paths in the config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from factorlm._common.files import exclusive_lock
from factorlm.distributed import import_ray as _import_ray
from factorlm.distributed import ray_connection
from factorlm.errors import BackendUnavailableError, ConfigError
from factorlm.sweeps.config import SweepConfig
from factorlm.sweeps.grid import Trial
from factorlm.sweeps.report import write_results
from factorlm.sweeps.select import Selection, TrialResult, select
from factorlm.sweeps.shared import StartPoints, plan_seeds, plan_shared, run_shared
from factorlm.sweeps.trial import read_result, run_trial, write_result

__all__ = ["SweepResult", "import_ray", "plan_seeds", "run_sweep"]

logger = logging.getLogger(__name__)

_LOCK_NAME = ".factorlm-sweep.lock"


def import_ray() -> Any:
    """The ``ray`` module, or BackendUnavailableError in one sentence naming the extra that
    installs it (``distributed.import_ray``, the one Ray import)."""
    return _import_ray("factorlm sweep", BackendUnavailableError)


@dataclass
class SweepResult:
    """Every trial's result, the selection, and the files written."""

    output_dir: Path
    trials: list[TrialResult]
    selection: Selection
    paths: dict[str, Path] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)  # ids run by this call (the rest were resumed)

    @property
    def best(self) -> TrialResult | None:
        return self.selection.best

    def trial(self, ident: str) -> TrialResult:
        return next(r for r in self.trials if r.id == ident)


@contextlib.contextmanager
def _sweep_lock(root: Path) -> Iterator[None]:
    """One sweep per output folder at a time (a second one would rerun the same trials)."""
    root.mkdir(parents=True, exist_ok=True)
    busy = (
        f"Sweep folder {root} is in use by another factorlm sweep; wait for it to "
        "finish or choose another output_dir."
    )
    with exclusive_lock(root / _LOCK_NAME, busy):
        yield


def _with_default_inputs(config: SweepConfig, console: Console) -> SweepConfig:
    """Check every trial's model and data up front (a missing file is a user error, not a grid
    of failed trials), fetching the embedded defaults once here instead of in every trial."""
    from factorlm.pipeline.stages import resolve_inputs

    if any(t.config.model is None or t.config.data.path is None for t in config.trials()):
        base = config.base
        model, data = resolve_inputs(base, console)
        base = base.model_copy(
            update={"model": model, "data": base.data.model_copy(update={"path": data})}
        )
        config = config.model_copy(update={"base": base})
    checked: set[tuple[str, str]] = set()
    for t in config.trials():
        pair = (str(t.config.model), str(t.config.data.path))
        if pair not in checked:
            checked.add(pair)
            resolve_inputs(t.config, console)  # both given: only checks they exist
    return config


def _node_label(ray: Any) -> str:
    import socket

    try:
        node = str(ray.get_runtime_context().get_node_id())[:8]
    except Exception:  # outside a Ray task
        node = "local"
    return f"{socket.gethostname()}:{node}"


def _remote_trial(
    trial_id: str,
    params: Mapping[str, Any],
    config: Mapping[str, Any],
    seed_from: str | None,
) -> dict[str, Any]:
    """The Ray task body (module level, so workers import it by name)."""
    import ray

    return run_trial(trial_id, params, config, seed_from=seed_from, node=_node_label(ray))


def _capacity(ray: Any, cpus_per_trial: int) -> int:
    """How many trials fit at once; refuses a per-trial CPU count no node has."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = [int(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
    if not any(c >= cpus_per_trial for c in per_node):
        raise ConfigError(
            f"ray.cpus_per_trial is {cpus_per_trial}, but no Ray node has that many CPUs "
            f"(nodes: {per_node or 'none'})."
        )
    return max(1, sum(c // cpus_per_trial for c in per_node))


class _Progress:
    """The live table: one row per trial, plus done / running / failed counts."""

    def __init__(self, trials: list[Trial]) -> None:
        self.trials = trials
        self.state: dict[str, str] = {t.id: "pending" for t in trials}
        self.results: dict[str, TrialResult] = {}
        self.shared = 0  # shared-stage jobs still running (sweeps.shared)
        self.started = time.perf_counter()

    def counts(self) -> dict[str, int]:
        values = list(self.state.values())
        return {s: values.count(s) for s in ("done", "running", "failed", "pending", "resumed")}

    def render(self) -> Group:
        table = Table(title="factorlm sweep", title_justify="left")
        axes = list(self.trials[0].params) if self.trials else []
        leaves = [a.rsplit(".", 1)[-1] for a in axes]
        headers = leaves if len(set(leaves)) == len(leaves) else axes
        table.add_column("trial", no_wrap=True, min_width=10)
        for header in headers:
            width = min(len(header), 10)
            table.add_column(
                header, no_wrap=True, overflow="ellipsis", min_width=width, max_width=14
            )
        table.add_column("status", no_wrap=True, overflow="ellipsis", min_width=6, max_width=24)
        for column in ("quality", "speedup"):
            table.add_column(column, justify="right", no_wrap=True, min_width=7)
        table.add_column("node", no_wrap=True, overflow="ellipsis", max_width=12)
        style = {"done": "green", "resumed": "green", "failed": "red", "running": "yellow"}
        for t in self.trials:
            state = self.state[t.id]
            r = self.results.get(t.id)
            status = Text(state, style=style.get(state, "dim"))
            if r is not None and r.error:
                status.append(f" {r.error}", style="dim")
            table.add_row(
                t.id,
                *(str(t.params[a]) for a in axes),
                status,
                f"{r.quality:.4f}" if r and r.quality is not None else "",
                f"{r.speedup:.2f}x" if r and r.speedup is not None else "",
                (r.node or "") if r else "",
            )
        c = self.counts()
        line = (
            f"{c['done'] + c['resumed']} done ({c['resumed']} resumed), {c['running']} running, "
            f"{c['failed']} failed, {c['pending']} pending"
            + (f", shared stages running ({self.shared})" if self.shared else "")
            + f" - {time.perf_counter() - self.started:.0f} s"
        )
        return Group(table, Text(line))


def run_sweep(
    config: SweepConfig,
    *,
    console: Console | None = None,
    address: str | None = None,
    max_concurrent: int | None = None,
    num_cpus: int | None = None,
    retry_failed: bool = False,
    on_trial: Callable[[TrialResult], None] | None = None,
) -> SweepResult:
    """Run every unfinished trial of ``config`` on Ray, then select and write the results.

    ``address``/``max_concurrent``/``num_cpus`` override the sweep file's ``ray`` section.
    Trials with a stored result are not rerun (``retry_failed`` reruns the failed ones).
    """
    ray = import_ray()
    console = console or Console(stderr=True)
    settings = config.ray
    address = address if address is not None else settings.address
    max_concurrent = max_concurrent or settings.max_concurrent
    config = _with_default_inputs(config, console)
    trials = config.trials()
    root = config.output_dir
    start = time.perf_counter()
    with _sweep_lock(root):
        progress = _Progress(trials)
        todo: list[Trial] = []
        for t in trials:
            stored = read_result(t.output_dir)
            if stored is not None and stored.id == t.id and (stored.ok or not retry_failed):
                progress.state[t.id] = "resumed" if stored.ok else "failed"
                progress.results[t.id] = stored
            else:
                todo.append(t)
        seeds = plan_seeds(trials)
        ran: list[str] = []
        nodes = 0
        if todo:
            # no address: a local Ray of num_cpus CPUs started for the sweep
            local_cpus = num_cpus or settings.num_cpus or os.cpu_count() or 1
            with ray_connection(address, num_cpus=local_cpus if address is None else None):
                nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
                limit = _capacity(ray, settings.cpus_per_trial)
                limit = min(limit, max_concurrent) if max_concurrent else limit
                ran = _schedule(
                    ray,
                    todo,
                    seeds,
                    progress,
                    limit,
                    settings.cpus_per_trial,
                    console,
                    on_trial,
                    root,
                )
        results = [progress.results[t.id] for t in trials]
        selection = select(results, config.select)
        counts = progress.counts()
        header = {
            "source": config.source,
            "output_dir": str(root),
            "axes": config.axes,
            "select": config.select.model_dump(mode="json"),
            "ray": {"address": address, "cpus_per_trial": settings.cpus_per_trial},
            "nodes": nodes,
            "wall_seconds": round(time.perf_counter() - start, 2),
            "counts": {
                "total": len(trials),
                "done": counts["done"] + counts["resumed"],
                "resumed": counts["resumed"],
                "failed": counts["failed"],
            },
        }
        paths = write_results(root, header, trials, results, selection)
    return SweepResult(root, results, selection, paths, ran)


def _warm_worker() -> None:
    """A Ray task that imports what every trial imports, on a worker that would idle meanwhile.

    Why: the shared stages run alone first; a worker importing torch, transformers and
    onnxruntime then (seconds) does not make the first trial it runs pay for them.
    """
    import importlib

    for name in _WARM_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    with contextlib.suppress(Exception):  # transformers loads its model classes on first use
        import transformers

        _ = transformers.AutoModel, transformers.AutoModelForSequenceClassification


_WARM_MODULES = (
    "torch",
    "factorlm.calibration.fisher",
    "factorlm.pipeline.run",
    "factorlm.pipeline.stages",
    "factorlm.compression",
    "factorlm.exporters.engine",
    "factorlm.exporters.ort.build",
    "factorlm.bench.run",
    "factorlm.bench.accuracy",
    "onnxruntime.transformers.optimizer",
    "sklearn.linear_model",
    "matplotlib.pyplot",
)


def _schedule(
    ray: Any,
    todo: list[Trial],
    seeds: dict[str, str | None],
    progress: _Progress,
    limit: int,
    cpus_per_trial: int,
    console: Console,
    on_trial: Callable[[TrialResult], None] | None,
    root: Path,
) -> list[str]:
    """Run the shared jobs, then submit trials as their seed finishes and slots free up.

    Trials that others wait for (a calibration's first trial) are submitted first; slots that
    nothing can use while the shared stages run warm their worker's imports.
    """
    options = {"num_cpus": cpus_per_trial, "max_retries": 0}
    trial_task = ray.remote(_remote_trial).options(**options, retry_exceptions=False)
    shared_task = ray.remote(run_shared).options(**options, retry_exceptions=False)
    warm_task = ray.remote(_warm_worker).options(**options)
    jobs, redirect = plan_shared(progress.trials, seeds, root)
    pending = {t.id for t in todo}
    jobs = {key: job for key, job in jobs.items() if pending.intersection(job.trials)}
    starts = StartPoints(
        jobs,
        redirect,
        seeds,
        {t.id: t.output_dir for t in progress.trials},
        finished=lambda ident: progress.state[ident] in ("done", "failed", "resumed"),
        job_ok=dict.fromkeys(jobs),
    )
    followers = Counter(seeds.get(t.id) for t in todo if t.id not in redirect)
    waiting = sorted(todo, key=lambda t: -followers.get(t.id, 0))  # stable: grid order within
    in_flight: dict[Any, tuple[str, Any]] = {}
    ran: list[str] = []
    warmed = False

    try:
        for job in jobs.values():
            in_flight[shared_task.remote(job.id, job.config)] = ("shared", job.id)
        progress.shared = len(jobs)
        with Live(progress.render(), console=console, refresh_per_second=2) as live:
            while waiting or in_flight:
                for t in list(waiting):
                    if len(in_flight) >= limit:
                        break
                    ready, source = starts.of(t.id)
                    if not ready:
                        continue
                    waiting.remove(t)
                    config = json.loads(t.config.model_dump_json())
                    in_flight[trial_task.remote(t.id, t.params, config, source)] = ("trial", t)
                    progress.state[t.id] = "running"
                    ran.append(t.id)
                if not warmed:
                    warmed = True
                    for _ in range(min(limit - len(in_flight), len(waiting))):
                        in_flight[warm_task.remote()] = ("warm", None)
                if not in_flight:  # pragma: no cover - a seed that never finishes
                    raise RuntimeError("sweep scheduler stalled: no trial can start")
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
                for ref in done:
                    kind, what = in_flight.pop(ref)
                    if kind == "shared":
                        starts.job_ok[what] = _collect_shared(ray, ref, what)
                        progress.shared -= 1
                    elif kind == "trial":
                        result = _collect(ray, ref, what)
                        progress.results[what.id] = result
                        progress.state[what.id] = "done" if result.ok else "failed"
                        if on_trial is not None:
                            on_trial(result)
                    else:
                        with contextlib.suppress(Exception):
                            ray.get(ref)  # a failed warm-up costs nothing but its time
                live.update(progress.render())
        if not console.is_terminal:
            console.print()  # the final table ends without a newline when not a terminal
    except BaseException:
        for ref in in_flight:  # interrupted: stop the running tasks (trials rerun on resume)
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    return ran


def _collect_shared(ray: Any, ref: Any, job_id: str) -> bool:
    """Whether a shared job finished (``StartPoints`` decides what its trials do when not)."""
    try:
        answer = ray.get(ref)
    except Exception as exc:
        answer = {"ok": False, "error": str(exc)}
    if not answer.get("ok"):
        logger.warning(
            "Shared stages %s failed (%s); their trials fall back to the seed order",
            job_id, answer.get("error"),
        )  # fmt: skip
    return bool(answer.get("ok"))


def _collect(ray: Any, ref: Any, trial: Trial) -> TrialResult:
    """The task's result; a crashed worker becomes a failed trial with a one-line error."""
    try:
        return TrialResult.from_dict(ray.get(ref))
    except Exception as exc:
        error = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        result = TrialResult(
            id=trial.id,
            params=dict(trial.params),
            status="failed",
            error=error,
            output_dir=str(trial.output_dir),
        )
        write_result(trial.output_dir, result)
        return result
