"""The shared stages of a sweep, run once as a task of their own before the trials fan out.

Why: without it the first trial of each input group runs alone (export, data split, the
original's engine and its task outputs, then its own compression, build and benchmark) while
every other trial waits for its folder: on two cores a third of a minute with a slot idle. The
shared job runs only what every trial of the group reuses (``run_pipeline(until=...)``), into
``<sweep>/shared/<key>/``; then the group's trials that need nothing more start from it at once,
and those that share a calibration wait only for the trial that computes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from factorlm.options import DATA_AWARE_METHODS
from factorlm.pipeline.artifacts import hash_json
from factorlm.sweeps.grid import Trial

__all__ = [
    "LAST_SHARED_STAGE",
    "SharedJob",
    "StartPoints",
    "calibration_kind",
    "plan_seeds",
    "plan_shared",
    "run_shared",
]

#: ``run_pipeline(until=...)``: the shared job stops after the original's recorded task outputs.
LAST_SHARED_STAGE = "reference-scores"
_FOLDER = "shared"


@dataclass
class SharedJob:
    """One input group's shared stages: where they go and which trials start from them."""

    id: str
    folder: Path
    config: dict[str, Any]
    trials: list[str] = field(default_factory=list)


def calibration_kind(trial: Trial) -> str | None:
    compress = trial.config.compress
    if compress.plan is not None:
        return None
    if compress.method == "fwsvd":
        return "fisher"
    return "stats" if compress.method in DATA_AWARE_METHODS else None


def plan_seeds(trials: list[Trial]) -> dict[str, str | None]:
    """For each trial, the earlier trial whose export/data/calibration stages it reuses.

    Trials with the same model, export, data and task share export and data; those that also
    calibrate alike share the statistics. The original's engine and its recorded task outputs
    travel with them (``trial.SHARED_STAGES``) and are reused where the build and benchmark
    settings match too (the stage keys decide). ``plan_shared`` turns each group into a shared
    job; a trial whose job failed falls back to waiting for its seed here.
    """
    first_inputs: dict[str, str] = {}
    first_stats: dict[str, str] = {}
    seeds: dict[str, str | None] = {}
    for t in trials:
        cfg = t.config
        inputs = hash_json(
            {
                "model": str(cfg.model),
                "export": cfg.export.model_dump(mode="json"),
                "data": cfg.data.model_dump(mode="json"),
                "task": cfg.benchmark.task,
            }
        )
        kind = calibration_kind(t)
        calibration = cfg.calibration_settings() if kind else None
        stats = hash_json({"inputs": inputs, "kind": kind, "calibration": calibration})
        leader = first_inputs.setdefault(inputs, t.id)
        stats_leader = first_stats.setdefault(stats, t.id)
        if stats_leader != t.id:
            seeds[t.id] = stats_leader
        elif leader != t.id:
            seeds[t.id] = leader
        else:
            seeds[t.id] = None
    return seeds


def plan_shared(
    trials: list[Trial], seeds: Mapping[str, str | None], root: Path
) -> tuple[dict[str, SharedJob], dict[str, str]]:
    """Shared jobs by id, and for each trial that needs no more than their stages, its job.

    ``seeds`` is ``plan_seeds``'s answer. Every trial of a group needs only the shared stages,
    except one that reuses its seed's calibration: it keeps waiting for that trial (the first of
    its calibration). A group of one trial gets no job: there is nobody to share with.
    """
    by_id = {t.id: t for t in trials}
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        leader = t.id
        while seeds.get(leader) is not None:
            leader = seeds[leader]  # type: ignore[assignment]
        groups.setdefault(leader, []).append(t)
    jobs: dict[str, SharedJob] = {}
    redirect: dict[str, str] = {}
    for leader, members in groups.items():
        if len(members) < 2:
            continue
        first = next(t for t in members if t.id == leader)
        job_id = f"shared-{leader}"
        folder = root / _FOLDER / leader
        config = json.loads(first.config.model_dump_json())
        config["output_dir"] = str(folder)
        job = jobs[job_id] = SharedJob(job_id, folder, config)
        for t in members:
            seed = seeds[t.id]
            if seed is None or not _shares_calibration(t, by_id[seed]):
                redirect[t.id] = job_id
                job.trials.append(t.id)
    return jobs, redirect


@dataclass
class StartPoints:
    """Whether each trial can start yet, and the folder it starts from.

    A trial of a shared job starts from the job's folder once the job is done. When the job
    failed, its trials fall back to their seeds (``plan_seeds``): the group's first trial starts
    bare and meets the error itself, the others wait for it as they did before shared jobs,
    instead of all starting bare at once and each redoing the export.
    """

    jobs: Mapping[str, SharedJob]
    redirect: Mapping[str, str]
    seeds: Mapping[str, str | None]
    folders: Mapping[str, Path]
    finished: Callable[[str], bool]
    job_ok: dict[str, bool | None] = field(default_factory=dict)  # None: still running

    def of(self, trial_id: str) -> tuple[bool, str | None]:
        job_id = self.redirect.get(trial_id)
        if job_id is not None and job_id in self.jobs:
            ok = self.job_ok.get(job_id)
            if ok is None:
                return False, None
            if ok:
                return True, str(self.jobs[job_id].folder)
        seed = self.seeds.get(trial_id)
        if seed is None:
            return True, None
        return self.finished(seed), str(self.folders[seed])


def _shares_calibration(trial: Trial, leader: Trial) -> bool:
    """Whether ``trial`` reuses ``leader``'s calibration stage (same kind and settings)."""
    kind = calibration_kind(trial)
    return kind is not None and (
        kind == calibration_kind(leader)
        and trial.config.calibration_settings() == leader.config.calibration_settings()
    )


def run_shared(
    job_id: str, config: Mapping[str, Any], lock_dir: str | None = None
) -> dict[str, Any]:
    """Run a shared job's stages (a Ray task body); ``{"id", "ok", "error", "seconds"}``.

    An error is returned, not raised: the trials then start without the shared stages and
    meet (and record) the same error themselves.
    """
    from factorlm.pipeline.config import parse_config
    from factorlm.sweeps.trial import ERROR_FILE, record_failure, run_on_node

    start = time.perf_counter()
    run_config = parse_config(dict(config), source=job_id)
    folder = Path(run_config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ERROR_FILE).unlink(missing_ok=True)  # a resumed sweep's old failure
    with (folder / "shared.log").open("a", encoding="utf-8") as log:
        console = Console(file=log, width=120, force_terminal=False, highlight=False)
        try:  # computes like a trial: steps aside for another trial's timed benchmark
            run_on_node(run_config, console, lock_dir, until=LAST_SHARED_STAGE)
        except Exception as exc:
            error = record_failure(folder, exc)
            return {"id": job_id, "ok": False, "error": error, "seconds": _since(start)}
    return {"id": job_id, "ok": True, "error": None, "seconds": _since(start)}


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)
