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
