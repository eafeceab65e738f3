"""Measure a ``planning.LatencyModel`` on ONNX Runtime, cached on disk per machine and engine.

Why measured: whether a factored pair beats its dense weight depends on the shape, the engine,
the precision, the threads and the token count, not on FLOPs alone (issue 17). For every
distinct weight shape the dense product and the factored pair at a few ranks
(``planning.measured_ranks``) run as small graphs (``costmodel.graphs``) in alternation, every
round in a fresh random order, like the benchmark's paired method; a rank's cost is the dense
median plus the median per-round difference to dense, so drifts of the machine cancel. The dense
whole model is built as the engine builder would build it and timed once.

Results are cached as JSON under ``cache_root()/costmodel``, keyed by the CPU, the library
versions (``_common.files.versions``), the engine configuration, the shape and the rank grid
(the whole model also by its file's sha256), so a second plan on the same machine measures
nothing. ``budget_s`` bounds the time spent measuring: each item gets a share of what is left
and stops after at least ``_MIN_ROUNDS`` rounds when its share is spent.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from factorlm._common.files import (
    cache_root,
    sha256_bytes,
    sha256_file,
    versions,
    write_text_atomic,
)
from factorlm._common.sessions import create_session
from factorlm.costmodel.graphs import copies_for, dense_graph, factored_graph
from factorlm.errors import ConfigError
from factorlm.planning.latency import LatencyCurve, LatencyModel, measured_ranks, shape_key

__all__ = [
    "COSTMODEL_FORMAT",
    "CostModelRun",
    "EngineConfig",
    "machine",
    "measure_latency_model",
]

logger = logging.getLogger(__name__)

COSTMODEL_FORMAT = "factorlm.costmodel/1"
Precision = Literal["fp32", "int8"]
Progress = Callable[[str, int, int], None]

_WARMUP = 3
_MIN_ROUNDS = 5
_MAX_ROUNDS = 30


@dataclass(frozen=True)
class EngineConfig:
    """The engine a latency is measured on: token shape, precision, threads, optimization."""

    batch: int = 1
    seq: int = 128
    precision: Precision = "fp32"
    threads: int = 0
    optimize: bool = True
    provider: str = "cpu"

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq < 1:
            raise ConfigError(f"latency shape {self.batch}x{self.seq} needs positive sizes.")
        if self.precision not in ("fp32", "int8"):
            raise ConfigError(
                f"latency precision {self.precision!r} is not measured; use fp32 or int8."
            )
        if self.provider != "cpu":
            raise ConfigError("the latency cost model measures the CPU provider only.")

    @property
    def label(self) -> str:
        opt = "optimized" if self.optimize else "unoptimized"
        threads = f"{self.threads} threads" if self.threads else "default threads"
        return f"{self.batch}x{self.seq} {self.precision} {opt}, {threads}, {self.provider}"

    @property
    def level(self) -> str:
        return "all" if self.optimize else "disable"


@dataclass
class CostModelRun:
    """A latency model and what building it cost: items timed now, items read from the cache."""

    model: LatencyModel
    measured: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    seconds: float = 0.0


def machine() -> dict[str, Any]:
    """What a latency number depends on besides the engine: the CPU and the usable cores."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import platform

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model or platform.processor() or platform.machine(), "cores": cores}


def _key(kind: str, config: EngineConfig, **extra: Any) -> str:
    record = {
        "format": COSTMODEL_FORMAT,
        "kind": kind,
        "machine": machine(),
        "versions": versions(),
        "engine": asdict(config),
        **extra,
    }
    return sha256_bytes(json.dumps(record, sort_keys=True))[:32]


def _read(folder: Path, key: str) -> dict[str, Any] | None:
    path = folder / f"{key}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == COSTMODEL_FORMAT else None


def _write(folder: Path, key: str, data: dict[str, Any]) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / f"{key}.json", json.dumps({"format": COSTMODEL_FORMAT, **data}))
    except OSError as exc:  # a read-only cache costs a re-measurement, not the plan
        logger.warning("could not cache a latency measurement in %s: %s", folder, exc)


def _alternate(
    runs: Sequence[Callable[[], None]], deadline: float, rng: np.random.Generator
) -> np.ndarray:
    """Seconds per run, shape ``(rounds, len(runs))``, each round in a fresh random order."""
    for _ in range(_WARMUP):
        for run in runs:
            run()
    rows: list[list[float]] = []
    while len(rows) < _MAX_ROUNDS and (len(rows) < _MIN_ROUNDS or time.perf_counter() < deadline):
        row = [0.0] * len(runs)
        for j in rng.permutation(len(runs)):
            start = time.perf_counter()
            runs[j]()
            row[j] = time.perf_counter() - start
        rows.append(row)
    return np.asarray(rows, dtype=np.float64)


def _session(model: Any, config: EngineConfig, work: Path, name: str) -> Any:
    """A session over a generated graph, int8-quantized like ``build --int8`` when asked."""
    import onnx

    if config.precision == "int8":
        from factorlm.exporters.ort.quantize import quantize_int8

        source, target = work / f"{name}.onnx", work / f"{name}.int8.onnx"
        onnx.save(model, str(source))
        quantize_int8(source, target, weight_type="uint8", per_channel=True, reduce_range=False)
        data: bytes | Path = target
    else:
        data = model.SerializeToString()
    return create_session(
        data,
        graph_optimization_level=config.level,
        intra_op_num_threads=config.threads,
        allow_spinning=False,
        log_severity_level=3,
    )


def _measure_curve(
    shape: tuple[int, int],
    ranks: Sequence[int],
    config: EngineConfig,
    deadline: float,
    rng: np.random.Generator,
) -> tuple[LatencyCurve, int]:
    m, n = shape
    copies = copies_for(config.batch * config.seq, m, n)
    graphs = [dense_graph(m, n, batch=config.batch, seq=config.seq, copies=copies, rng=rng)]
    graphs += [
        factored_graph(m, n, r, batch=config.batch, seq=config.seq, copies=copies, rng=rng)
        for r in ranks
    ]
    feeds = {"x": rng.standard_normal((config.batch, config.seq, m)).astype(np.float32)}
    with tempfile.TemporaryDirectory(prefix="factorlm-costmodel-") as tmp:
        sessions = [_session(g, config, Path(tmp), f"g{i}") for i, g in enumerate(graphs)]
    runs = [lambda s=s: s.run(None, feeds) for s in sessions]
    times = _alternate(runs, deadline, rng)
    dense = float(np.median(times[:, 0]))
    factored = [dense + float(np.median(times[:, j] - times[:, 0])) for j in range(1, len(runs))]
    curve = LatencyCurve(
        shape=(m, n),
        dense_ms=dense * 1e3 / copies,
        ranks=tuple(int(r) for r in ranks),
        factored_ms=tuple(t * 1e3 / copies for t in factored),
    )
    return curve, times.shape[0]


def _measure_model(model: Path, config: EngineConfig, deadline: float) -> tuple[float, int]:
    """Median ms of the dense model built as ``factorlm build`` builds it (ORT, this config)."""
    from factorlm.bench.feeds import Shape, make_feeds, vocab_size_of
    from factorlm.bench.runners import load_runner
    from factorlm.exporters.engine import build_engine
    from factorlm.options import BuildOptions

    options = BuildOptions(optimize=config.optimize, int8=config.precision == "int8")
    with tempfile.TemporaryDirectory(prefix="factorlm-costmodel-") as tmp:
        engine = Path(tmp) / "engine"
        build_engine(model, engine, options)
        runner = load_runner(
            engine, intra_op_threads=config.threads, graph_optimization_level=config.level
        )
        with runner:
            feeds = make_feeds(
                runner.inputs,
                Shape(config.batch, config.seq),
                rng=np.random.default_rng(0),
                vocab_size=vocab_size_of(model),
            )

            def infer() -> None:
                runner.infer(feeds)

            times = _alternate([infer], deadline, np.random.default_rng(0))
    return float(np.median(times[:, 0])) * 1e3, times.shape[0]


def measure_latency_model(
    model: str | os.PathLike[str],
    shapes: Sequence[tuple[int, int]],
    config: EngineConfig,
    *,
    multiple: int = 8,
    budget_s: float = 120.0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> CostModelRun:
    """Latency curves of ``shapes`` and the dense ``model``'s latency on ``config``.

    Each item is read from the cache when present; otherwise it is timed within its share of
    ``budget_s`` and cached. ``progress(item, done, total)`` is called before each item.
    """
    start = time.perf_counter()
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "costmodel"
    model = Path(model)
    unique = sorted({(int(m), int(n)) for m, n in shapes})
    grids = {s: measured_ranks(s[0], s[1], multiple) for s in unique}
    unique = [s for s in unique if grids[s]]
    items: list[tuple[str, str]] = [
        ("model", _key("model", config, sha256=sha256_file(model))),
        *((shape_key(s), _key("curve", config, shape=list(s), ranks=grids[s])) for s in unique),
    ]
    run = CostModelRun(model=LatencyModel(0.0, {}))
    found: dict[str, dict[str, Any]] = {}
    for label, key in items:
        data = _read(folder, key)
        if data is not None:
            found[label] = data
            run.cached.append(label)
    todo = [(label, key) for label, key in items if label not in found]
    rng = np.random.default_rng(seed)
    for done, (label, key) in enumerate(todo):
        if progress is not None:
            progress(f"latency {label}", done, len(todo))
        remaining = budget_s - (time.perf_counter() - start)
        deadline = time.perf_counter() + max(0.0, remaining) / (len(todo) - done)
        if label == "model":
            ms, rounds = _measure_model(model, config, deadline)
            data = {"model_ms": ms, "rounds": rounds}
        else:
            shape = next(s for s in unique if shape_key(s) == label)
            curve, rounds = _measure_curve(shape, grids[shape], config, deadline, rng)
            data = {"curve": curve.to_dict(), "rounds": rounds}
        _write(folder, key, {**data, "machine": machine(), "engine": asdict(config)})
        found[label] = data
        run.measured.append(label)
        logger.info("measured latency of %s in %d rounds", label, rounds)
    if progress is not None and todo:
        progress("latency", len(todo), len(todo))
    if run.measured and time.perf_counter() - start > budget_s:
        logger.warning(
            "measuring the latency model took %.0f s, over its budget of %.0f s",
            time.perf_counter() - start,
            budget_s,
        )
    curves = {label: LatencyCurve.from_dict(found[label]["curve"]) for label, _ in items[1:]}
    run.model = LatencyModel(
        model_ms=float(found["model"]["model_ms"]),
        curves=curves,
        config={**asdict(config), **machine()},
    )
    run.seconds = time.perf_counter() - start
    return run
