"""Measure a ``planning.LatencyModel`` on ONNX Runtime, cached on disk per machine and engine.

Why measured: whether a factored form beats its dense weight depends on the shape, the engine,
the precision, the threads and the token count, not on FLOPs alone (issue 17). For every
curve (``planning.CurveSpec``: a weight shape in one factorized form, low-rank, low-rank +
sparse, joint Q/K/V or a Kronecker split) the dense product and the factored form at a few
ranks run as small graphs (``costmodel.graphs``) in alternation, every round in a fresh random
order (``bench.latency.measure_alternating``, the benchmark's paired method); a rank's cost is
the dense median plus the median per-round difference to dense, so drifts of the machine
cancel. The dense whole model is built as the engine builder would build it and timed once:
for a decode step (``EngineConfig.past``) with a KV cache of ``past`` random positions, so the
attention over the cache is inside the measured rest; the weights' curves are timed at the
step's token count (batch x 1).

Timed alone, a small graph keeps its weight in cache; inside the model every weight is read
cold, so the engine's saving from a factored weight differs from the curve's (issue 17's runs:
1.11x the curves at 1x128, 0.9x at 8x128, constant across plans to ±0.03). For low-rank
methods the dense model is therefore timed in alternation with a *probe* of itself, every
plannable weight factored (random factors) at ``PROBE_FRACTION`` of its break-even rank, and
the ratio of the probe's measured saving to the one its curves predict becomes the model's
``savings_scale`` (``planning.LatencyModel``), which scales every curve's saving.

Results are cached as JSON under ``cache_root()/costmodel``, keyed by the CPU, the library
versions (``_common.files.versions``), the engine configuration, the curve's form, shape and
rank grid (the whole model also by its file's sha256; curves not by the past length, which
does not change a weight's product), so a second plan on the same machine measures nothing.
``budget_s`` bounds the time spent measuring: each item gets a share of what is left and stops
after at least ``_MIN_ROUNDS`` rounds when its share is spent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
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
from factorlm.bench.latency import measure_alternating
from factorlm.bench.runners import BaseRunner, OrtRunner
from factorlm.costmodel.graphs import copies_for, form_graph
from factorlm.decompose import break_even_rank, round_rank
from factorlm.errors import ConfigError
from factorlm.planning import CandidateLike
from factorlm.planning.latency import (
    CurveSpec,
    LatencyCurve,
    LatencyModel,
    lowrank_spec,
)

__all__ = [
    "COSTMODEL_FORMAT",
    "PROBE_FRACTION",
    "CostModelRun",
    "EngineConfig",
    "machine",
    "measure_latency_model",
    "probe_ranks",
    "savings_scale",
]

logger = logging.getLogger(__name__)

COSTMODEL_FORMAT = "factorlm.costmodel/2"
Precision = Literal["fp32", "int8"]
Progress = Callable[[str, int, int], None]

#: Rounds of ``bench.latency.measure_alternating`` per item: at least the minimum, then until
#: the item's share of the budget is spent, at most the maximum.
_MIN_ROUNDS = 5
_ROUNDS: dict[str, Any] = {"warmup": 3, "iterations": 30, "min_iterations": _MIN_ROUNDS}
#: Fused ops of the engine that hold the Q/K/V product (joint groups are timed as one pair).
_ATTENTION_OPS = ("Attention", "QAttention")
#: The savings-scale probe cuts every probed weight to this fraction of its parameter
#: break-even rank (about a third of the parameters kept: a plan near 2x at 1x128).
PROBE_FRACTION = 0.35
#: The savings scale is trusted in this range; outside it (or when the probe saves under
#: ``_PROBE_MIN_SAVING`` of the model) the curves are used as measured (scale 1).
_SCALE_RANGE = (0.5, 2.0)
_PROBE_MIN_SAVING = 0.02


@dataclass(frozen=True)
class EngineConfig:
    """The engine a latency is measured on: token shape, precision, threads, optimization.

    ``past`` > 0: one decode step of ``batch`` sequences (``seq`` must be 1) against a KV cache
    of ``past`` positions; 0: a prefill / encoder run of ``batch`` x ``seq`` tokens.
    """

    batch: int = 1
    seq: int = 128
    precision: Precision = "fp32"
    threads: int = 0
    optimize: bool = True
    provider: str = "cpu"
    past: int = 0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq < 1:
            raise ConfigError(f"latency shape {self.batch}x{self.seq} needs positive sizes.")
        if self.past < 0:
            raise ConfigError(f"latency past length {self.past} must be 0 or positive.")
        if self.past and self.seq != 1:
            raise ConfigError(
                f"a decode step (past {self.past}) runs one new token per sequence: use the "
                f"latency shape {self.batch}x1, not {self.batch}x{self.seq}."
            )
        if self.precision not in ("fp32", "int8"):
            raise ConfigError(
                f"latency precision {self.precision!r} is not measured; use fp32 or int8."
            )
        if self.provider != "cpu":
            raise ConfigError("the latency cost model measures the CPU provider only.")

    @property
    def tokens(self) -> int:
        """Tokens each weight's product runs per inference (a decode step: the batch)."""
        return self.batch * self.seq

    @property
    def label(self) -> str:
        opt = "optimized" if self.optimize else "unoptimized"
        threads = f"{self.threads} threads" if self.threads else "default threads"
        shape = (
            f"decode {self.batch}x1 past {self.past}" if self.past else f"{self.batch}x{self.seq}"
        )
        return f"{shape} {self.precision} {opt}, {threads}, {self.provider}"

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


def _runner(model: Any, config: EngineConfig, work: Path, name: str) -> OrtRunner:
    """A runner over a generated graph, int8-quantized like ``build --int8`` when asked."""
    import onnx

    path = work / f"{name}.onnx"
    onnx.save(model, str(path))
    if config.precision == "int8":
        from factorlm.exporters.ort.quantize import quantize_int8

        target = work / f"{name}.int8.onnx"
        quantize_int8(path, target, weight_type="uint8", per_channel=True, reduce_range=False)
        path = target
    return OrtRunner(
        path,
        name=name,
        intra_op_threads=config.threads,
        graph_optimization_level=config.level,
    )


def _measure_curve(
    spec: CurveSpec,
    config: EngineConfig,
    deadline: float,
    rng: np.random.Generator,
) -> tuple[LatencyCurve, int]:
    """Dense and every rank of ``spec`` in one alternating run; ms per product (per copy)."""
    m, n = spec.shape
    copies = copies_for(config.tokens, m, n)
    graphs = [
        form_graph(spec, r, batch=config.batch, seq=config.seq, copies=copies, rng=rng)
        for r in (None, *spec.ranks)
    ]
    feeds = {"x": rng.standard_normal((config.batch, config.seq, m)).astype(np.float32)}
    with tempfile.TemporaryDirectory(prefix="factorlm-costmodel-") as tmp:
        runners = [_runner(g, config, Path(tmp), f"g{i}") for i, g in enumerate(graphs)]
        for runner in runners:  # loaded into memory: the files may go
            runner.__enter__()
    try:
        times = measure_alternating(runners, feeds, rng=rng, deadline=deadline, **_ROUNDS)
    finally:
        for runner in runners:
            runner.__exit__(None, None, None)
    dense = float(np.median(times[:, 0]))
    factored = [dense + float(np.median(times[:, j] - times[:, 0])) for j in range(1, len(runners))]
    curve = LatencyCurve(
        shape=(m, n),
        dense_ms=dense * 1e3 / copies,
        ranks=tuple(int(r) for r in spec.ranks),
        factored_ms=tuple(t * 1e3 / copies for t in factored),
    )
    return curve, times.shape[0]


def _model_feeds(model: Path, runner: BaseRunner, config: EngineConfig) -> dict[str, np.ndarray]:
    """Random feeds of the configured shape; a decode step gets a KV cache of ``past``."""
    from factorlm.bench.decode import DecodePoint, decoder_layout, max_positions_of, point_feeds
    from factorlm.bench.feeds import Shape, make_feeds, vocab_size_of

    rng = np.random.default_rng(0)
    vocab = vocab_size_of(model)
    if not config.past:
        return make_feeds(runner.inputs, Shape(config.batch, config.seq), rng=rng, vocab_size=vocab)
    layout = decoder_layout(runner.inputs, runner.outputs)
    if layout is None:
        raise ConfigError(
            f"latency past {config.past}: {model.name} has no KV-cache inputs; a decode step "
            "needs a decoder exported with past (text-generation-with-past)."
        )
    limit = max_positions_of(model.parent)
    if limit is not None and config.past + 1 > limit:
        raise ConfigError(
            f"latency past {config.past} exceeds the model's {limit} positions "
            "(max_position_embeddings)."
        )
    point = DecodePoint("decode", config.batch, 1, config.past)
    return point_feeds(runner.inputs, layout, point, rng=rng, vocab_size=vocab)


#: Engines built for timing whole models in this process, by model file, engine options and
#: probe: a decode and a prefill configuration of one model at one precision share them.
_BUILT: dict[tuple[Any, ...], tuple[Path, dict[str, int]]] = {}
_BUILT_KEEP = 4
_BUILD_ROOT: list[tempfile.TemporaryDirectory[str]] = []


def _built_engine(
    model: Path, config: EngineConfig, probe: Sequence[tuple[CandidateLike, int]] = ()
) -> tuple[Path, dict[str, int]]:
    """The engine of ``model`` (with ``probe``'s weights factored) built as ``factorlm build``
    builds it for this config, and its fusion counts; built once per process (the last few kept).
    """
    from factorlm.exporters.engine import build_engine
    from factorlm.options import BuildOptions

    stat = model.stat()
    key = (
        str(model.resolve()),
        stat.st_mtime_ns,
        stat.st_size,
        config.optimize,
        config.precision,
        tuple(sorted((c.name, r) for c, r in probe)),
    )
    found = _BUILT.get(key)
    if found is not None and found[0].is_dir():
        return found
    if not _BUILD_ROOT:
        _BUILD_ROOT.append(tempfile.TemporaryDirectory(prefix="factorlm-costmodel-engines-"))
    folder = Path(tempfile.mkdtemp(dir=_BUILD_ROOT[0].name))
    source = _probe_model(model, probe, folder / "probe") if probe else model
    options = BuildOptions(optimize=config.optimize, int8=config.precision == "int8")
    manifest = build_engine(source, folder / "engine", options)
    if probe:
        shutil.rmtree(folder / "probe", ignore_errors=True)
    while len(_BUILT) >= _BUILT_KEEP:  # oldest first: their folders go
        old = _BUILT.pop(next(iter(_BUILT)))
        shutil.rmtree(old[0].parent, ignore_errors=True)
    _BUILT[key] = (folder / "engine", dict(manifest.fusions.get("engine", {})))
    return _BUILT[key]


def _measure_model(
    model: Path,
    config: EngineConfig,
    deadline: float,
    probe: Sequence[tuple[CandidateLike, int]] = (),
) -> dict[str, Any]:
    """Median ms of the dense model; with ``probe``, also of the model with those weights
    factored at those ranks (random factors: values do not change the time), timed in
    alternation with the dense model (``probe_ms`` = dense + the median per-round difference).
    """
    from factorlm.bench.runners import load_runner

    engine, fused = _built_engine(model, config)
    engines = [engine] + ([_built_engine(model, config, probe)[0]] if probe else [])
    runners = [
        load_runner(e, intra_op_threads=config.threads, graph_optimization_level=config.level)
        for e in engines
    ]
    for item in runners:
        item.__enter__()
    try:
        feeds = _model_feeds(model, runners[0], config)
        rng = np.random.default_rng(0)
        times = measure_alternating(runners, feeds, rng=rng, deadline=deadline, **_ROUNDS)
    finally:
        for item in runners:
            item.__exit__(None, None, None)
    record: dict[str, Any] = {
        "model_ms": float(np.median(times[:, 0])) * 1e3,
        "rounds": int(times.shape[0]),
        "attention_fused": any(fused.get(op, 0) > 0 for op in _ATTENTION_OPS),
    }
    if probe:
        diff = float(np.median(times[:, 1] - times[:, 0]))
        record["probe_ms"] = record["model_ms"] + diff * 1e3
    return record


def probe_ranks(
    probe: Sequence[tuple[CandidateLike, CurveSpec]], multiple: int
) -> list[tuple[CandidateLike, int]]:
    """The rank each probed weight is cut to: ``PROBE_FRACTION`` of its break-even, on the grid
    and inside its curve's measured ranks; weights used more than once are not probed."""
    found = []
    for cand, spec in probe:
        if not spec.ranks or (not cand.members and _calls(cand) != 1):
            continue
        rank = round_rank(max(1, round(PROBE_FRACTION * break_even_rank(*spec.shape))), multiple)
        found.append((cand, int(min(max(rank, spec.ranks[0]), spec.ranks[-1]))))
    return found


def _calls(cand: CandidateLike) -> int:
    """Products a weight runs per inference (as the planner counts them)."""
    return 1 if cand.members else max(1, sum(1 for u in cand.uses if u.form != "gather"))


def _probe_model(model: Path, probe: Sequence[tuple[CandidateLike, int]], folder: Path) -> Path:
    """``model`` with each probed weight replaced by a random low-rank pair (joint groups: one
    shared left factor), written as its rewrite passes write it, with the model's sidecars."""
    from factorlm._common.files import copy_sidecars
    from factorlm.decompose import LowRank
    from factorlm.io import load_model, save_model
    from factorlm.passes import JointLinearPass, LowRankLinearPass, RemoveReplacedWeightsPass

    rng = np.random.default_rng(0)
    graph = load_model(model)
    single: dict[str, LowRank] = {}
    joint: dict[str, LowRank] = {}
    replaced: list[str] = []
    for cand, rank in probe:
        m, n = cand.shape
        left = (rng.standard_normal((m, rank)) / np.sqrt(m)).astype(np.float32)
        right = (rng.standard_normal((rank, n)) / np.sqrt(rank)).astype(np.float32)
        (joint if cand.members else single)[cand.name] = LowRank(left, right)
        replaced.extend(cand.members or (cand.name,))
    LowRankLinearPass(single)(graph)
    JointLinearPass(joint)(graph)
    RemoveReplacedWeightsPass(replaced)(graph)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    save_model(graph, path)
    copy_sidecars(model, folder)
    return path


def savings_scale(
    record: Mapping[str, Any],
    probe: Sequence[tuple[CandidateLike, int]],
    curves: Mapping[str, LatencyCurve],
    specs: Mapping[str, CurveSpec],
) -> tuple[float, float | None]:
    """α = the probe's measured saving over the saving its curves predict; and that prediction.

    1.0 (curves as measured) without a probe, when the curves predict under 2 % of the model
    saved, or when α falls outside 0.5-2 (a measurement to distrust, logged).
    """
    if "probe_ms" not in record or not probe:
        return 1.0, None
    predicted = 0.0
    for cand, rank in probe:
        curve = curves.get(specs[cand.name].key)
        if curve is None:
            return 1.0, None
        predicted += _calls(cand) * (curve.dense_ms - curve.at(rank))
    model_ms, measured = float(record["model_ms"]), float(record["model_ms"] - record["probe_ms"])
    if predicted < _PROBE_MIN_SAVING * model_ms:
        return 1.0, model_ms - predicted
    alpha = measured / predicted
    if not _SCALE_RANGE[0] <= alpha <= _SCALE_RANGE[1]:
        logger.warning(
            "latency probe: the engine saved %.3f ms where the curves predict %.3f ms (x%.2f); "
            "using the curves as measured",
            measured,
            predicted,
            alpha,
        )
        return 1.0, model_ms - predicted
    return alpha, model_ms - predicted


def _spec_of(item: CurveSpec | Sequence[int], multiple: int) -> CurveSpec | None:
    """A curve to measure: a ``CurveSpec`` as given, a bare ``(m, n)`` shape as its low-rank pair."""
    return item if isinstance(item, CurveSpec) else lowrank_spec(item, multiple)


def measure_latency_model(
    model: str | os.PathLike[str],
    curves: Sequence[CurveSpec | tuple[int, int]],
    config: EngineConfig,
    *,
    multiple: int = 8,
    budget_s: float = 120.0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    seed: int = 0,
    probe: Sequence[tuple[CandidateLike, CurveSpec]] = (),
) -> CostModelRun:
    """Latency curves of ``curves`` and the dense ``model``'s latency on ``config``.

    ``curves`` are ``CurveSpec``s or bare ``(m, n)`` shapes (their low-rank pair on the
    ``multiple`` grid). A joint Q/K/V spec is timed as its concatenated pair when the engine
    fuses Attention (known once the model is built). Each item is read from the cache when
    present; otherwise it is timed within its share of ``budget_s`` and cached.
    ``progress(item, done, total)`` is called before each item.

    ``probe``: low-rank candidates with their curve (``planning.candidate_spec``); the dense model
    is then timed in alternation with a probe of itself, those weights factored at
    ``probe_ranks``, and the model's ``savings_scale`` is the probe's measured saving over the
    one its curves predict (``savings_scale``; cached with the model's time).
    """
    start = time.perf_counter()
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "costmodel"
    model = Path(model)
    wanted = [s for s in (_spec_of(c, multiple) for c in curves) if s is not None]
    run = CostModelRun(model=LatencyModel(0.0, {}))
    rng = np.random.default_rng(seed)
    # Curves do not depend on the cache length: a decode plan at any past shares them.
    curve_config = replace(config, past=0)

    def share(remaining_items: int) -> float:
        remaining = budget_s - (time.perf_counter() - start)
        return time.perf_counter() + max(0.0, remaining) / max(1, remaining_items)

    probed = probe_ranks(probe, multiple)
    described = sorted([c.name, r] for c, r in probed)
    extra = {"probe": described, "probe_fraction": PROBE_FRACTION} if probed else {}
    model_key = _key("model", config, sha256=sha256_file(model), **extra)
    record = _read(folder, model_key)
    if record is not None:
        run.cached.append("model")
    else:
        if progress is not None:
            progress("latency model", 0, 1)
        record = _measure_model(model, config, share(1 + len(wanted)), probed)
        _write(folder, model_key, {**record, "machine": machine(), "engine": asdict(config)})
        run.measured.append("model")
        logger.info("measured latency of the model in %d rounds", record["rounds"])
    fused = bool(record.get("attention_fused", False))
    specs: dict[str, CurveSpec] = {}
    for spec in wanted:
        if spec.form == "joint" and fused:  # one Attention product: the concatenated pair
            spec = replace(spec, form="lowrank", widths=())
        specs.setdefault(spec.key, spec)
    found: dict[str, dict[str, Any]] = {}
    keys = {
        label: _key("curve", curve_config, spec=spec.to_record()) for label, spec in specs.items()
    }
    for label, key in keys.items():
        data = _read(folder, key)
        if data is not None:
            found[label] = data
            run.cached.append(label)
    todo = [label for label in specs if label not in found]
    for done, label in enumerate(todo):
        if progress is not None:
            progress(f"latency {label}", done, len(todo))
        curve, rounds = _measure_curve(specs[label], curve_config, share(len(todo) - done), rng)
        data = {"curve": curve.to_dict(), "rounds": rounds}
        _write(
            folder,
            keys[label],
            {
                **data,
                "machine": machine(),
                "engine": asdict(curve_config),
                "spec": specs[label].to_record(),
            },
        )
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
    measured = {label: LatencyCurve.from_dict(found[label]["curve"]) for label in specs}
    probe_specs = {}
    for cand, spec in probe:
        if spec.form == "joint" and fused:
            spec = replace(spec, form="lowrank", widths=())
        probe_specs[cand.name] = spec
    alpha, predicted = savings_scale(record, probed, measured, probe_specs)
    if probed:
        logger.info(
            "latency probe (%d weights at %.2f of break-even): %.3f ms measured, %s ms predicted "
            "by the curves, dense %.3f ms: savings scale %.3f",
            len(probed),
            PROBE_FRACTION,
            float(record.get("probe_ms", float("nan"))),
            "-" if predicted is None else f"{predicted:.3f}",
            float(record["model_ms"]),
            alpha,
        )
    probe_config = (
        {"probe_ms": record.get("probe_ms"), "probe_predicted_ms": predicted} if probed else {}
    )
    run.model = LatencyModel(
        model_ms=float(record["model_ms"]),
        curves=measured,
        config={
            **asdict(config),
            **machine(),
            "attention_fused": fused,
            "savings_scale": alpha,
            **probe_config,
        },
        savings_scale=alpha,
    )
    run.seconds = time.perf_counter() - start
    return run
