"""Curves of every factorized form, and decode steps timed against a real KV cache.

The graphs of each form compute what their rewrite pass computes (checked in numbers against
numpy). Real timings run on tiny settings (the minimum number of rounds) and are checked only
for orderings with a wide margin in work (no wall-clock thresholds): a Kronecker curve of a
64x larger product is slower; a joint Q/K/V group with one shared left factor is faster than
three separate pairs of the same rank. Decode: the model is fed a cache of ``past`` positions
and the weights' curves are timed at the step's token count.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import factorlm.costmodel.measure as measure
from factorlm.costmodel import EngineConfig, latency_curves, measure_latency_model
from factorlm.costmodel.graphs import form_graph, sparse_rows
from factorlm.errors import ConfigError
from factorlm.passes import analyze
from factorlm.planning.latency import (
    CurveSpec,
    joint_spec,
    kron_specs,
    losparse_spec,
    lowrank_spec,
)
from models import mlp, run_ort, write_model

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

from bench_models import bigram_lm

_TINY = EngineConfig(batch=1, seq=32, threads=1)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _run(spec: CurveSpec, rank: int | None, x: np.ndarray) -> tuple[list[np.ndarray], Any]:
    graph = form_graph(spec, rank, batch=x.shape[0], seq=x.shape[1], copies=2,
                       rng=np.random.default_rng(1))  # fmt: skip
    onnx.checker.check_model(graph, full_check=True)
    return run_ort(graph, {"x": x}), _weights(graph)


def test_kron_graph_computes_the_sum_of_kronecker_products() -> None:
    (spec, *_) = kron_specs((24, 20), 4)
    a_in, a_out, b_in, b_out = spec.kron or (0, 0, 0, 0)
    x = np.random.default_rng(0).standard_normal((2, 3, 24)).astype(np.float32)
    for terms in (1, 3):
        (y, _), w = _run(spec, terms, x)
        a_hat, b_hat = w["c0_a"], w["c0_b"]
        assert a_hat.shape == (terms * a_out, a_in) and b_hat.shape == (terms * b_in, b_out)
        full = sum(
            np.kron(a_hat[i * a_out : (i + 1) * a_out].T, b_hat[i * b_in : (i + 1) * b_in])
            for i in range(terms)
        )
        np.testing.assert_allclose(y, x @ full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("structure", ["column", "unstructured"])
def test_losparse_graph_adds_the_sparse_branch(structure: str) -> None:
    spec = losparse_spec((32, 48), 8, structure, 0.25)
    assert spec is not None and spec.key == f"32x48/losparse-{structure}-0.25"
    x = np.random.default_rng(0).standard_normal((2, 3, 32)).astype(np.float32)
    (y, _), w = _run(spec, 8, x)
    low = x @ w["c0_l"] @ w["c0_r"]
    if structure == "column":
        rows = w["c0_rows"]
        assert rows.size == sparse_rows(32, 0.25) == 8 and w["c0_s"].shape == (8, 48)
        sparse = x[..., rows] @ w["c0_s"]
    else:
        sparse = x @ w["c0_s"]
    np.testing.assert_allclose(y, low + sparse, rtol=1e-4, atol=1e-4)


def test_joint_graph_shares_one_left_factor_unless_fused() -> None:
    spec = joint_spec((32, 40), (16, 12, 12), 8)
    assert spec is not None and spec.form == "joint" and spec.key == "32x40/joint-16+12+12"
    x = np.random.default_rng(0).standard_normal((1, 3, 32)).astype(np.float32)
    outputs, w = _run(spec, 8, x)
    assert len(outputs) == 6  # 2 copies x 3 members
    t = x @ w["c0_l"]
    for j, width in enumerate((16, 12, 12)):
        assert w[f"c0_r{j}"].shape == (8, width)
        np.testing.assert_allclose(outputs[j], t @ w[f"c0_r{j}"], rtol=1e-4, atol=1e-4)
    dense, _ = _run(spec, None, x)
    assert [d.shape[-1] for d in dense] == [16, 12, 12] * 2  # three separate products
    fused = joint_spec((32, 40), (16, 12, 12), 8, fused=True)
    assert fused == lowrank_spec((32, 40), 8)  # one Attention product: the concatenated pair
    with pytest.raises(ConfigError, match="add up"):
        CurveSpec("joint", (32, 40), (8,), widths=(16, 16))


def _time(specs: list[CurveSpec], config: EngineConfig, tmp_path: Path) -> dict[str, Any]:
    """Measure only the curves (the whole-model record is stood in by a cached one)."""
    rng = np.random.default_rng(0)
    return {s.key: measure._measure_curve(s, config, 0.0, rng)[0] for s in specs}


def test_kron_curve_orders_two_shapes_by_their_work(tmp_path: Path) -> None:
    small, large = kron_specs((64, 64), 1)[0], kron_specs((512, 512), 1)[0]
    curves = _time([small, large], _TINY, tmp_path)
    c_small, c_large = curves[small.key], curves[large.key]
    assert c_small.ranks[0] == 1 and c_large.ranks[-1] == large.ranks[-1]
    # 512x512 does 64x the dense work of 64x64 and ~10x its one-term Kronecker work.
    assert c_large.dense_ms > c_small.dense_ms
    assert c_large.at(1) > c_small.at(1)
    assert c_large.at(c_large.ranks[-1]) > c_large.at(1)  # more terms, more work


def test_joint_prediction_is_below_three_separate_pairs(tmp_path: Path) -> None:
    joint = CurveSpec("joint", (256, 768), (64,), widths=(256, 256, 256))
    single = CurveSpec("lowrank", (256, 256), (64,))
    curves = _time([joint, single], _TINY, tmp_path)
    # x @ L once + three t @ R_j (4 products of 256x64) vs three pairs (6 such products).
    assert curves[joint.key].at(64) < 3 * curves[single.key].at(64)


def test_latency_curves_follow_the_method(tmp_path: Path) -> None:
    import onnx_ir as ir

    model = ir.serde.deserialize_model(mlp(128, 256, 128, decay=0.05))
    candidates = analyze(model, min_size=0).candidates
    keys = {m: [s.key for s in latency_curves(candidates, m, 8)] for m in ("svd", "kron")}
    assert keys["svd"] == ["128x256", "256x128"]
    assert all("/kron-" in k for k in keys["kron"]) and len(keys["kron"]) >= 2
    sparse = latency_curves(candidates, "losparse", 8, sparse=("column", 0.1))
    assert [s.key for s in sparse] == ["128x256/losparse-column-0.1", "256x128/losparse-column-0.1"]


class _Recorder:
    """The real timing loop, recording the feeds each run got (shapes only)."""

    def __init__(self) -> None:
        self.feeds: list[dict[str, tuple[int, ...]]] = []
        self.real = measure.measure_alternating

    def __call__(self, runners: Any, feeds: dict[str, np.ndarray], **kwargs: Any) -> np.ndarray:
        self.feeds.append({k: tuple(v.shape) for k, v in feeds.items()})
        result: np.ndarray = self.real(runners, feeds, **kwargs)
        return result


def test_decode_step_is_timed_with_a_kv_cache_and_decode_token_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = bigram_lm(tmp_path / "lm" / "model.onnx", with_past=True)
    recorder = _Recorder()
    monkeypatch.setattr(measure, "measure_alternating", recorder)
    cache = tmp_path / "cache"
    config = EngineConfig(batch=2, seq=1, threads=1, past=24, optimize=False)
    shape = (16, 64)
    run = measure_latency_model(model, [shape], config, budget_s=1e-3, cache_dir=cache)
    model_feeds, curve_feeds = recorder.feeds
    assert model_feeds["input_ids"] == (2, 1)
    assert model_feeds["attention_mask"] == (2, 25)  # past + the new token
    assert model_feeds["past_key_values.0.key"] == (2, 2, 24, 8)
    assert curve_feeds == {"x": (2, 1, 16)}  # the weights' products run on batch x 1 tokens
    assert run.model.config["past"] == 24 and run.model.model_ms > 0
    # Another cache length re-times the model only: a weight's product does not depend on it.
    again = measure_latency_model(
        model, [shape], EngineConfig(batch=2, seq=1, threads=1, past=8, optimize=False),
        budget_s=1e-3, cache_dir=cache,
    )  # fmt: skip
    assert again.measured == ["model"] and again.cached == ["16x64"]
    assert recorder.feeds[-1]["past_key_values.0.value"] == (2, 2, 8, 8)


def test_decode_needs_one_token_and_a_decoder_with_past(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="1x1"):
        EngineConfig(batch=1, seq=4, past=8)
    with pytest.raises(ConfigError, match="0 or positive"):
        EngineConfig(batch=1, seq=1, past=-1)
    encoder = write_model(mlp(32, 64, 32), tmp_path / "mlp" / "mlp.onnx")
    config = EngineConfig(batch=1, seq=1, threads=1, past=8, optimize=False)
    with pytest.raises(ConfigError, match="KV-cache"):
        measure_latency_model(encoder, [], config, budget_s=1e-3, cache_dir=tmp_path / "c")
    assert "decode 1x1 past 8" in config.label and config.tokens == 1


@pytest.mark.parametrize(
    "spec",
    [
        kron_specs((64, 128), 1)[0],
        losparse_spec((64, 128), 8, "column", 0.1),
        joint_spec((64, 96), (32, 32, 32), 8),
    ],
    ids=["kron", "losparse", "joint"],
)
def test_every_form_is_timed_quantized_for_int8(spec: CurveSpec | None) -> None:
    assert spec is not None
    config = EngineConfig(batch=1, seq=8, threads=1, precision="int8")
    curve, rounds = measure._measure_curve(spec, config, 0.0, np.random.default_rng(0))
    assert rounds == measure._MIN_ROUNDS and curve.ranks == spec.ranks and curve.dense_ms > 0
    assert len(curve.factored_ms) == len(spec.ranks)


@pytest.mark.parametrize("fused", [False, True])
def test_joint_group_is_one_pair_when_the_engine_fuses_attention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fused: bool
) -> None:
    def engine(model: Path, config: EngineConfig, deadline: float, probe: object) -> dict[str, Any]:
        return {"model_ms": 5.0, "rounds": 5, "attention_fused": fused}  # the built engine's say

    def timing(runners: list[object], feeds: object, **_: object) -> np.ndarray:
        return np.tile(np.linspace(1e-3, 2e-3, len(runners)), (5, 1))

    monkeypatch.setattr(measure, "_measure_model", engine)
    monkeypatch.setattr(measure, "measure_alternating", timing)
    path = write_model(mlp(32, 64, 32), tmp_path / "mlp.onnx")
    joint = joint_spec((48, 64), (32, 16, 16), 8)
    assert joint is not None
    run = measure_latency_model(path, [joint], _TINY, cache_dir=tmp_path / "cache")
    assert run.model.attention_fused is fused
    assert list(run.model.curves) == (["48x64"] if fused else ["48x64/joint-32+16+16"])
