"""``factorlm run``: export → data split → reference → reference-scores → calibrate → compress →
[recover] → build → benchmark.

Each stage is a plain function over the previous stages' folders (``pipeline.stages``).
``ArtifactStore`` keys every stage by its settings, its inputs' keys and the versions of
factorlm and of the libraries the stage uses (``STAGE_LIBRARIES``), so a second run with the
same config reuses every folder and finishes in seconds, while a config change or a library
upgrade reruns only the stages it affects; ``force=True`` reruns them all. The original model's
engine (``reference``) and its recorded task outputs (``reference-scores``, replayed by the
benchmark; latency still alternates both real engines) are keyed without the compression, so a
run that changes only the compression or recovery reuses them. A lock on the output
folder (``lock_output_dir``) makes a second concurrent run on the same folder refuse instead of
deleting the first run's files.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from factorlm.distributed import ray_scope_on_demand
from factorlm.options import DATA_AWARE_METHODS
from factorlm.pipeline import stages
from factorlm.pipeline.artifacts import (
    ArtifactStore,
    StageResult,
    hash_files,
    hash_json,
    lock_output_dir,
)
from factorlm.pipeline.config import RunConfig
from factorlm.pipeline.memory import StagePeak

__all__ = [
    "STAGE_LIBRARIES",
    "STAGE_ORDER",
    "RunResult",
    "installed_versions",
    "run_pipeline",
    "stage_versions",
]

logger = logging.getLogger(__name__)

#: The order the stages run in (a run skips those its config does not need).
STAGE_ORDER: tuple[str, ...] = (
    "export",
    "data",
    "reference",
    "reference-scores",
    "calibrate",
    "compress",
    "recover",
    "build",
    "benchmark",
)

#: The distributions whose versions each stage's output depends on (factorlm for all of them).
STAGE_LIBRARIES: dict[str, tuple[str, ...]] = {
    "export": ("torch", "transformers", "optimum", "onnx", "onnxruntime", "onnxruntime-gpu"),
    "data": (),
    "calibrate": (
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "numpy",
        "tokenizers",
        "transformers",
        "torch",
    ),
    "compress": ("onnx", "onnx-ir", "numpy", "scipy"),
    "recover": ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy"),
    "reference": ("onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"),
    "build": ("onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"),
    # the reference engine's raw outputs on the tokenized data (the probe is fitted per run)
    "reference-scores": (
        "onnxruntime",
        "onnxruntime-gpu",
        "tensorrt",
        "numpy",
        "tokenizers",
        "transformers",
    ),
    "benchmark": (
        "onnxruntime",
        "onnxruntime-gpu",
        "tensorrt",
        "numpy",
        "scipy",
        "scikit-learn",
        "tokenizers",
        "transformers",
    ),
}


def installed_versions() -> dict[str, str]:
    """Installed versions of factorlm and of every library in ``STAGE_LIBRARIES`` (absent: skipped).

    Read from package metadata, so asking imports none of them.
    """
    import importlib.metadata

    from factorlm._common.files import versions

    found = dict(versions())
    wanted = {"factorlm", *(lib for libs in STAGE_LIBRARIES.values() for lib in libs)}
    for dist in sorted(wanted - set(found)):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def stage_versions(stage: str, installed: dict[str, str]) -> dict[str, str]:
    """The versions a stage's cache key includes: factorlm's and its libraries'."""
    names = ("factorlm", *STAGE_LIBRARIES[stage])
    return {name: installed[name] for name in names if name in installed}


@dataclass
class RunResult:
    """Every stage's outcome plus the benchmark report; ``passed`` decides the exit status."""

    output_dir: Path
    stages: list[StageResult] = field(default_factory=list)
    report: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return bool(self.report is None or self.report.get("passed", True))

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.name == name)


def run_pipeline(
    config: RunConfig,
    *,
    console: Console | None = None,
    on_stage: Callable[[StageResult], None] | None = None,
    force: bool = False,
    timing_guard: Callable[[], AbstractContextManager[Any]] | None = None,
    until: str | None = None,
) -> RunResult:
    """Run every stage of ``config`` into ``config.output_dir`` and return what each produced.

    ``force`` reruns every stage even when its cached output is current. The output folder is
    locked for the whole run: a second run on it raises ``ConfigError`` and touches nothing.
    ``timing_guard`` is entered around the benchmark's timed sections (a sweep's node lock).
    ``until`` names the last stage to run (``"reference-scores"``: only the stages that do not
    depend on the compression, which a sweep runs once for all its trials); a config that skips
    that stage stops before the first stage after it in ``STAGE_ORDER``. The result then has no
    report.
    """
    if until is not None and until not in STAGE_ORDER:
        raise ValueError(f"until must name a stage ({', '.join(STAGE_ORDER)}), not {until!r}")
    console = console or Console(stderr=True)
    root = Path(config.output_dir)
    with lock_output_dir(root):
        return _run_locked(config, console, on_stage, force, timing_guard, until)


class _Stop(Exception):
    """Raised after the stage ``until`` names: the run ends there."""


def _run_locked(
    config: RunConfig,
    console: Console,
    on_stage: Callable[[StageResult], None] | None,
    force: bool,
    timing_guard: Callable[[], AbstractContextManager[Any]] | None = None,
    until: str | None = None,
) -> RunResult:
    result = RunResult(output_dir=Path(config.output_dir))
    with suppress(_Stop):
        _run_stages(config, console, on_stage, force, timing_guard, until, result)
    return result


def _run_stages(
    config: RunConfig,
    console: Console,
    on_stage: Callable[[StageResult], None] | None,
    force: bool,
    timing_guard: Callable[[], AbstractContextManager[Any]] | None,
    until: str | None,
    result: RunResult,
) -> None:
    model, data = stages.resolve_inputs(config, console)
    installed = installed_versions()
    store = ArtifactStore(Path(config.output_dir))
    store.update_header({"config": json.loads(config.model_dump_json()), "versions": installed})

    def stage(name: str, key: str, build: Callable[[Path], dict[str, Any] | None]) -> StageResult:
        if until is not None and STAGE_ORDER.index(name) > STAGE_ORDER.index(until):
            raise _Stop  # ``until`` was skipped (e.g. no reference-scores for task none)
        console.rule(f"[bold]{name}")
        start = time.perf_counter()
        # A library upgrade must not reuse engines or reports made with the old one.
        key = hash_json({"settings": key, "versions": stage_versions(name, installed)})

        def measured(out: Path) -> dict[str, Any]:
            # The stage's own peak RSS goes into the manifest; what it loaded is released after.
            with StagePeak() as peak:
                info = build(out)
            return {**(info or {}), "memory": peak.record()}

        done = store.run(name, key, measured, force=force)
        if done.skipped:
            console.print(f"[green]✓[/] {name}: unchanged, reused {done.path}")
        else:
            memory = done.info.get("memory", {})
            peak = memory.get("peak_rss_mib")
            console.print(
                f"[green]✓[/] {name}: done in {time.perf_counter() - start:.1f} s"
                + (f", peak RSS {peak:.0f} MiB" if peak is not None else "")
            )
        result.stages.append(done)
        if on_stage is not None:
            on_stage(done)
        if name == until:
            raise _Stop
        return done

    model_key = hash_files([model])
    exported = stage(
        "export",
        hash_json({"model": model_key, "export": config.export.model_dump(mode="json")}),
        lambda out: stages.export_model(config, model, out),
    )
    split = stage(
        "data",
        hash_json(
            {
                "data": hash_files([data]),
                "cfg": config.data.model_dump(mode="json"),
                "task": config.benchmark.task,  # perplexity splits contiguously
                "v": 3,
            }
        ),
        lambda out: stages.split_data(config, data, out),
    )
    build_cfg = {
        "cfg": config.build.model_dump(mode="json"),
        **({"data": split.key} if config.build.int8_mode == "static" else {}),
    }
    # The original's engine and its task outputs depend on neither compression nor recovery:
    # their own stages, so a run that changes only those (a sweep's trials) reuses them.
    reference = stage(
        "reference",
        hash_json({"export": exported.key, **build_cfg}),
        lambda out: stages.build_reference(config, exported.path, split.path, out),
    )
    from factorlm.bench.replay import UNREPLAYED_TASKS  # (generation times its reference)

    record: StageResult | None = None
    if config.benchmark.task not in ("none", *UNREPLAYED_TASKS):
        record = stage(
            "reference-scores",
            hash_json(
                {
                    "reference": reference.key,
                    "data": split.key,
                    "task": stages.reference_task_settings(config, split.path),
                }
            ),
            lambda out: stages.score_reference(config, reference.path, split.path, out),
        )
    stats_dir: Path | None = None
    method = config.compress.method
    # calibrate and compress share one Ray session (compress.ray_address), started by the
    # first of them that runs: none when both are reused
    with ray_scope_on_demand(config.compress.ray_address) as on_ray:
        if (method in DATA_AWARE_METHODS or method == "fwsvd") and config.compress.plan is None:
            calibrated = stage(
                "calibrate",
                hash_json(
                    {
                        "export": exported.key,
                        "data": split.key,
                        "fisher": method == "fwsvd",
                        "cfg": config.calibration_settings(),
                    }
                ),
                lambda out: (
                    stages.calibrate(config, model, exported.path, split.path, out)
                    if method == "fwsvd"  # Fisher gradients: PyTorch in this process, no Ray
                    else on_ray(stages.calibrate, config, model, exported.path, split.path, out)
                ),
            )
            stats_dir = calibrated.path
        plan_key = hash_files([config.compress.plan]) if config.compress.plan else None
        compressed = stage(
            "compress",
            hash_json(
                {
                    "export": exported.key,
                    "stats": stats_dir and result.stage("calibrate").key,
                    # Ray or not, the output is bit-identical: the address is not part of the key.
                    "cfg": config.compress.model_dump(mode="json", exclude={"ray_address"}),
                    "plan": plan_key,
                }
            ),
            lambda out: on_ray(
                stages.compress_model, config, exported.path, stats_dir, out, split.path
            ),
        )
    candidate = compressed
    if config.recover.method is not None:
        recover_key = hash_json(
            {
                "compress": compressed.key,
                "data": split.key,
                "cfg": config.recover.model_dump(mode="json"),
                "max_length": config.calibration.max_length,
            }
        )
        # Checkpoints live outside the atomically published folder, keyed like the stage, so an
        # interrupted run resumes and a changed config never resumes someone else's training.
        checkpoints = Path(config.output_dir) / f"recover-checkpoints-{recover_key[:12]}"
        if force and checkpoints.is_dir():  # rerun from scratch, not from our own checkpoints
            shutil.rmtree(checkpoints)
        candidate = stage(
            "recover",
            recover_key,
            lambda out: stages.recover_model(
                config,
                model,
                exported.path,
                compressed.path,
                stats_dir,
                split.path,
                out,
                checkpoints,
            ),
        )
    built = stage(
        "build",
        hash_json({"reference": reference.key, "candidate": candidate.key, **build_cfg}),
        lambda out: stages.build_engines(
            config, exported.path, reference.path, candidate.path, split.path, out
        ),
    )
    bench_cfg = config.benchmark.model_dump(mode="json")
    baseline_key = hash_files([config.benchmark.baseline]) if config.benchmark.baseline else None
    bench = stage(
        "benchmark",
        hash_json(
            {
                "reference": reference.key,
                "record": record.key if record is not None else None,
                "build": built.key,
                "data": split.key,
                "cfg": bench_cfg,
                "baseline": baseline_key,
            }
        ),
        lambda out: stages.benchmark(
            config,
            reference.path,
            built.path,
            split.path,
            out,
            record.path if record is not None else None,
            timing_guard,
        ),
    )
    result.report = json.loads((bench.path / "report.json").read_text(encoding="utf-8"))
