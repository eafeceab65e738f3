"""The measured cost model: graphs compute what they claim, the cache answers a second plan.

No wall-clock thresholds: timings are checked for structure (positive, one per measured rank)
and the cache by counting what is measured. The real timings run on tiny shapes with a budget
of a fraction of a second (the minimum number of rounds). The timing loop is the benchmark's
(``bench.latency.measure_alternating``); the counting tests replace it by a stand-in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import factorlm.costmodel
import factorlm.costmodel.measure as measure
from factorlm.cli import main
from factorlm.compression import compress
from factorlm.costmodel import EngineConfig, engine_config, measure_latency_model
from factorlm.costmodel.graphs import copies_for, dense_graph, factored_graph
from factorlm.errors import ConfigError
from factorlm.options import CompressOptions
from factorlm.planning import LatencyCurve, LatencyModel, measured_ranks, shape_key
from factorlm.planning.latency import CurveSpec
from models import mlp, run_ort, write_model

_CONFIG = EngineConfig(batch=1, seq=8, threads=1)


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    return write_model(mlp(128, 256, 128, decay=0.05), tmp_path / "in" / "mlp.onnx")


def test_graphs_compute_the_dense_and_factored_products() -> None:
    rng = np.random.default_rng(0)
    dense = dense_graph(32, 48, batch=2, seq=3, copies=2, rng=rng)
    factored = factored_graph(32, 48, 8, batch=2, seq=3, copies=2, rng=rng)
    for model in (dense, factored):
        onnx.checker.check_model(model, full_check=True)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in factored.graph.initializer}
    x = rng.standard_normal((2, 3, 32)).astype(np.float32)
    y0, y1 = run_ort(factored, {"x": x})
    np.testing.assert_allclose(y1, x @ weights["c1_l"] @ weights["c1_r"], rtol=1e-5, atol=1e-5)
    assert weights["c1_l"].shape == (32, 8) and weights["c1_r"].shape == (8, 48)
    assert y0.shape == (2, 3, 48) and len(dense.graph.output) == 2
    assert copies_for(1, 32, 48) == 8 and copies_for(4096, 1024, 1024) == 1


def test_real_measurement_has_one_time_per_rank_and_is_cached(
    mlp_path: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = measure_latency_model(
        mlp_path, [(128, 256), (256, 128), (128, 256)], _CONFIG, budget_s=1e-3, cache_dir=cache
    )
    assert sorted(first.measured) == ["128x256", "256x128", "model"] and first.cached == []
    model = first.model
    assert model.model_ms > 0
    for shape in [(128, 256), (256, 128)]:
        curve = model.curve(shape)
        assert curve is not None
        assert curve.ranks == tuple(measured_ranks(*shape, 8))
        assert curve.dense_ms > 0 and len(curve.factored_ms) == len(curve.ranks)
    records = [json.loads(f.read_text()) for f in cache.glob("*.json")]
    assert len(records) == 3
    assert all(r["rounds"] == measure._MIN_ROUNDS for r in records)  # the budget was spent
    second = measure_latency_model(mlp_path, [(256, 128), (128, 256)], _CONFIG, cache_dir=cache)
    assert second.measured == [] and sorted(second.cached) == ["128x256", "256x128", "model"]
    assert second.model == model


def test_int8_curve_is_measured_on_quantized_graphs(tmp_path: Path) -> None:
    config = EngineConfig(batch=1, seq=8, threads=1, precision="int8")
    curve, rounds = measure._measure_curve(
        CurveSpec("lowrank", (64, 128), (8, 24)), config, 0.0, np.random.default_rng(0)
    )
    assert rounds == 5 and curve.ranks == (8, 24) and curve.dense_ms > 0


class _Counter:
    """Stands in for the timing loop: counts measurements, returns fixed synthetic times."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, runners: list[object], feeds: object, **_: object) -> np.ndarray:
        self.calls += 1
        return np.tile(np.linspace(1e-3, 2e-3, len(runners)), (5, 1))


def test_cache_key_follows_engine_config_versions_and_model(
    mlp_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = _Counter()
    monkeypatch.setattr(measure, "measure_alternating", counter)
    cache = tmp_path / "cache"
    shapes = [(128, 256)]
    measure_latency_model(mlp_path, shapes, _CONFIG, cache_dir=cache)
    assert counter.calls == 2  # the model and one curve
    measure_latency_model(mlp_path, shapes, _CONFIG, cache_dir=cache)
    assert counter.calls == 2  # a second plan measures nothing
    for config in (
        EngineConfig(batch=1, seq=8, threads=2),
        EngineConfig(batch=2, seq=8, threads=1),
        EngineConfig(batch=1, seq=8, threads=1, optimize=False),
    ):
        before = counter.calls
        run = measure_latency_model(mlp_path, shapes, config, cache_dir=cache)
        assert counter.calls == before + 2 and sorted(run.measured) == ["128x256", "model"]
    before = counter.calls
    run = measure_latency_model(mlp_path, shapes, _CONFIG, multiple=16, cache_dir=cache)
    assert counter.calls == before + 1 and run.measured == ["128x256"]  # a new rank grid
    versions = measure.versions()
    monkeypatch.setattr(measure, "versions", lambda: {**versions, "onnxruntime": "0.0.0"})
    measure_latency_model(mlp_path, shapes, _CONFIG, cache_dir=cache)
    assert counter.calls == before + 3
    other = tmp_path / "other.onnx"
    onnx.save_model(mlp(128, 256, 128, seed=3), str(other))
    run = measure_latency_model(other, shapes, _CONFIG, cache_dir=cache)
    assert run.measured == ["model"]  # another model: its own whole-model time, shared curves


def test_engine_config_from_options() -> None:
    config = engine_config(
        CompressOptions(target_speedup=1.5, latency_shape="8x128", latency_threads=2)
    )
    assert (config.batch, config.seq, config.threads, config.precision) == (8, 128, 2, "fp32")
    with pytest.raises(ConfigError):
        EngineConfig(precision="int4")  # type: ignore[arg-type]


def test_engine_config_plans_a_decode_step_with_latency_past() -> None:

    options = CompressOptions(target_speedup=1.5, latency_shape="2x1", latency_past=64)
    config = engine_config(options)
    assert (config.batch, config.seq, config.past, config.tokens) == (2, 1, 64, 2)
    with pytest.raises(ConfigError, match="BATCHx1"):
        CompressOptions(target_speedup=1.5, latency_shape="1x128", latency_past=64)
    assert CompressOptions(target_speedup=1.5, method="kron").latency_target  # no longer refused


def _fake_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A synthetic cost model instead of timing: fc1's pair pays, fc2's never does."""

    def fake(
        model: Path, shapes: list[tuple[int, int]], config: EngineConfig, **_: object
    ) -> object:
        def curve(shape: tuple[int, int], base: float, slope: float) -> LatencyCurve:
            ranks = tuple(measured_ranks(*shape, 8))
            return LatencyCurve(shape, 2.0, ranks, tuple(base + slope * r for r in ranks))

        curves = {
            shape_key((128, 256)): curve((128, 256), 0.05, 0.02),
            shape_key((256, 128)): curve((256, 128), 2.5, 0.0),
        }
        return measure.CostModelRun(model=LatencyModel(6.0, curves, {"batch": config.batch}))

    monkeypatch.setattr(factorlm.costmodel, "measure_latency_model", fake)


def test_compress_with_target_speedup_plans_for_latency(
    mlp_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_model(monkeypatch)
    result = compress(
        mlp_path, tmp_path / "out.onnx", method="svd", min_size=0, target_speedup=1.25
    )
    plan = json.loads((tmp_path / "out.plan.json").read_text())
    assert plan["latency"]["target_ms"] == pytest.approx(6.0 / 1.25)
    assert plan["latency"]["predicted_ms"] <= 6.0 / 1.25 + 1e-9
    assert set(plan["weights"]) == {"fc1.weight"} == set(result.plan.weights)
    assert plan["latency"]["dense_weights"] == {"fc2.weight": 2.0}
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-speedup", "1.0"], "--target-speedup"),
        (["--target-speedup", "0.5"], "--target-speedup"),
        (["--target-speedup", "1.5", "--target-latency-ms", "3"], "alternatives"),
        (["--target-latency-ms", "3", "--energy", "0.9"], "energy"),
        (["--target-speedup", "1.5", "--latency-shape", "8by128"], "BATCHxSEQUENCE"),
    ],
)
def test_cli_refuses_bad_targets_with_exit_2(
    mlp_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "out"
    code = main(["compress", str(mlp_path), "-o", str(out), "--method", "svd", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_cli_target_speedup_shows_the_prediction(
    mlp_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fake_model(monkeypatch)
    out = tmp_path / "out"
    argv = ["compress", str(mlp_path), "-o", str(out), "--method", "svd", "--min-size", "0"]
    assert main([*argv, "--target-latency-ms", "5.0"]) == 0
    assert "latency ms (predicted)" in capsys.readouterr().out
    plan = json.loads((out / "model.plan.json").read_text())
    assert plan["budget"]["target_ms"] == 5.0 and plan["latency"]["predicted_ms"] <= 5.0


def _probe(path: Path) -> list[tuple[object, CurveSpec]]:
    from factorlm.io import load_model
    from factorlm.passes import analyze

    return factorlm.costmodel.latency_probe(analyze(load_model(path)).candidates, "whiten", 8)


def test_probe_model_replaces_each_probed_weight_by_a_pair(mlp_path: Path, tmp_path: Path) -> None:
    probe = _probe(mlp_path)
    assert sorted(c.name for c, _ in probe) == ["fc1.weight", "fc2.weight"]  # type: ignore[attr-defined]
    assert factorlm.costmodel.latency_probe([c for c, _ in probe], "kron", 8) == []  # type: ignore[misc]
    ranks = measure.probe_ranks(probe, 8)  # type: ignore[arg-type]
    for cand, rank in ranks:
        spec = dict((c.name, s) for c, s in probe)[cand.name]  # type: ignore[attr-defined]
        assert rank % 8 == 0 and spec.ranks[0] <= rank <= spec.ranks[-1]
        assert rank < measure.break_even_rank(*cand.shape)
    path = measure._probe_model(mlp_path, ranks, tmp_path / "probe")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    names = {i.name for i in model.graph.initializer}
    assert "fc1.weight" not in names and "fc2.weight" not in names
    assert {"fc1.weight.factorlm_left", "fc2.weight.factorlm_right"} <= names
    x = np.ones((1, 4, 128), np.float32)
    (y,) = run_ort(model, {"x": x})
    assert y.shape == run_ort(onnx.load(str(mlp_path)), {"x": x})[0].shape


def test_savings_scale_is_the_probe_saving_over_the_curves(mlp_path: Path) -> None:
    probe = _probe(mlp_path)
    ranks = measure.probe_ranks(probe, 8)  # type: ignore[arg-type]
    specs = {c.name: s for c, s in probe}  # type: ignore[attr-defined]
    curves = {
        s.key: LatencyCurve(s.shape, 2.0, s.ranks, tuple(0.1 + 0.01 * r for r in s.ranks))
        for s in specs.values()
    }
    predicted = sum(2.0 - curves[specs[c.name].key].at(r) for c, r in ranks)
    alpha, at = measure.savings_scale({"model_ms": 10.0, "probe_ms": 10.0 - 1.2 * predicted},
                                      ranks, curves, specs)  # fmt: skip
    assert alpha == pytest.approx(1.2) and at == pytest.approx(10.0 - predicted)
    # a saving the curves cannot explain (x3) is distrusted; no probe time: curves as measured
    assert measure.savings_scale({"model_ms": 10.0, "probe_ms": 10.0 - 3 * predicted},
                                 ranks, curves, specs)[0] == 1.0  # fmt: skip
    assert measure.savings_scale({"model_ms": 10.0}, ranks, curves, specs) == (1.0, None)
    flat = {
        k: LatencyCurve(c.shape, 2.0, c.ranks, (1.999,) * len(c.ranks)) for k, c in curves.items()
    }
    assert measure.savings_scale({"model_ms": 10.0, "probe_ms": 9.0}, ranks, flat, specs)[0] == 1.0


def test_probe_is_timed_against_the_dense_model_and_cached(
    mlp_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def timing(runners: list[object], feeds: object, **_: object) -> np.ndarray:
        calls.append(len(runners))
        if len(runners) == 2:  # the dense model and its probe: the probe saves 0.6 ms
            return np.tile([2.0e-3, 1.4e-3], (5, 1))
        return np.tile([2e-3, *np.linspace(0.2e-3, 1.9e-3, len(runners) - 1)], (5, 1))

    monkeypatch.setattr(measure, "measure_alternating", timing)
    cache, shapes = tmp_path / "cache", [(128, 256), (256, 128)]
    probe = _probe(mlp_path)
    first = measure_latency_model(mlp_path, shapes, _CONFIG, cache_dir=cache, probe=probe)  # type: ignore[arg-type]
    assert calls[0] == 2 and len(calls) == 3
    model = first.model
    ranks = measure.probe_ranks(probe, 8)  # type: ignore[arg-type]
    predicted = 0.0
    for cand, rank in ranks:
        curve = model.raw_curve(cand.shape)
        assert curve is not None
        predicted += curve.dense_ms - curve.at(rank)
    assert model.savings_scale == pytest.approx(0.6 / predicted)
    assert model.config["probe_ms"] == pytest.approx(model.model_ms - 0.6)
    assert model.curve((128, 256)) != model.raw_curve((128, 256))
    second = measure_latency_model(mlp_path, shapes, _CONFIG, cache_dir=cache, probe=probe)  # type: ignore[arg-type]
    assert second.measured == [] and second.model == model and len(calls) == 3
    plain = measure_latency_model(mlp_path, shapes, _CONFIG, cache_dir=cache)
    assert plain.measured == ["model"] and plain.model.savings_scale == 1.0  # its own record
    # Another configuration of the same engine (threads, a decode past) times the engines the
    # first one built: no build again.
    import factorlm.exporters.engine as engine

    built: list[object] = []
    build = engine.build_engine
    monkeypatch.setattr(engine, "build_engine", lambda *a, **k: built.append(a) or build(*a, **k))
    other = measure_latency_model(
        mlp_path, shapes, EngineConfig(batch=1, seq=8, threads=2), cache_dir=cache, probe=probe
    )  # type: ignore[arg-type]
    assert "model" in other.measured and built == []
