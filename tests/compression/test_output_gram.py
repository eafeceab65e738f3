"""``compress(loss_aware=True)`` with the full output-gradient Gram (``stats.output_gram``).

The planner and the factorizer pass the full Gram (taking priority over the diagonal), a joint
Q/K/V weight gets the block diagonal of its members' Grams, and ``loss_aware=False`` ignores it.
The compressed model's outputs are checked against the decomposition core's closed form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import scipy.linalg
from onnx import TensorProto, helper, numpy_helper

from factorlm.calibration import CalibrationStats
from factorlm.compression import compress
from factorlm.decompose import prepared_lowrank
from factorlm.errors import ConfigError
from factorlm.planning import load_plan
from factorlm.planning.lowrank import statistics_for
from models import _finish, random_weight, run_ort

D, H = 24, 16
MEMBERS = ("q.weight", "k.weight", "v.weight")
JOINT = "+".join(MEMBERS)


def _qkv(path: Path) -> Path:
    """x feeds three MatMuls whose outputs are the model's output, side by side."""
    inits = [
        numpy_helper.from_array(random_weight(D, H, 3 + i, decay=0.15), name)
        for i, name in enumerate(MEMBERS)
    ]
    nodes = [
        helper.make_node("MatMul", ["x", name], [name[0]], name=f"{name[0]}/MatMul")
        for name in MEMBERS
    ]
    nodes.append(helper.make_node("Concat", ["q", "k", "v"], ["y"], name="concat", axis=-1))
    graph = helper.make_graph(
        nodes,
        "qkv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3 * H])],
        inits,
    )
    onnx.save(_finish(graph), path)
    return path


def _stats() -> CalibrationStats:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, D)) * np.logspace(-1, 0.5, D)
    grams, fishers = {}, {}
    for i, name in enumerate(MEMBERS):
        g = rng.standard_normal((300, H)) @ (rng.standard_normal((H, H)) * (1 + i))
        grams[name] = g.T @ g
        fishers[name] = np.diag(grams[name]).copy()
    return CalibrationStats(
        gram={n: x.T @ x for n in MEMBERS},
        output_fisher=fishers,
        output_gram=grams,
        tokens=200,
    )


def _matrix(source: Path) -> np.ndarray:
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(source)).graph.initializer}
    return np.concatenate([inits[n] for n in MEMBERS], axis=1)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return run_ort(str(path), {"x": x.astype(np.float32)})[0].astype(np.float64)


def test_joint_qkv_takes_the_block_diagonal_of_the_members_output_grams(tmp_path: Path) -> None:
    source = _qkv(tmp_path / "qkv.onnx")
    stats = _stats()
    options: dict[str, Any] = {"method": "whiten", "ratio": 0.6, "min_size": 0, "joint_qkv": True}
    out = tmp_path / "full.onnx"
    compress(source, out, stats=stats, loss_aware=True, rank_multiple=4, **options)
    entry = load_plan(out.with_name("full.plan.json")).weights[JOINT]
    assert entry.rank is not None and entry.rank < D
    x = np.random.default_rng(6).standard_normal((9, D))
    full = scipy.linalg.block_diag(*(stats.output_gram[n] for n in MEMBERS))
    want = prepared_lowrank(
        _matrix(source).astype(np.float64), "whiten", entry.rank,
        gram=stats.gram["q.weight"], output_gram=full,
    ).reconstruct()  # fmt: skip
    got = _run(out, x)
    np.testing.assert_allclose(got, x @ want, rtol=1e-4, atol=1e-5)

    # The diagonal alone (no output_gram) gives different factors: the full Gram was used.
    diagonal = CalibrationStats(gram=stats.gram, output_fisher=stats.output_fisher, tokens=200)
    compress(source, tmp_path / "diag.onnx", stats=diagonal, loss_aware=True, rank_multiple=4,
             plan=out.with_name("full.plan.json"), **options)  # fmt: skip
    assert np.abs(_run(tmp_path / "diag.onnx", x) - got).max() > 1e-3

    # loss_aware=False ignores both output statistics: plain whitening.
    compress(source, tmp_path / "plain.onnx", stats=stats, rank_multiple=4,
             plan=out.with_name("full.plan.json"), **options)  # fmt: skip
    plain = prepared_lowrank(
        _matrix(source).astype(np.float64), "whiten", entry.rank, gram=stats.gram["q.weight"]
    ).reconstruct()
    np.testing.assert_allclose(_run(tmp_path / "plain.onnx", x), x @ plain, rtol=1e-4, atol=1e-5)
    # Neither the caller's stats nor their output Grams were modified.
    assert set(stats.output_gram) == set(MEMBERS)


def test_loss_aware_accepts_an_output_gram_alone(tmp_path: Path) -> None:
    source = _qkv(tmp_path / "qkv.onnx")
    stats = _stats()
    only = CalibrationStats(gram=stats.gram, output_gram=stats.output_gram, tokens=200)
    result = compress(source, tmp_path / "a.onnx", method="whiten", ratio=0.6, min_size=0,
                      stats=only, loss_aware=True, rank_multiple=4)  # fmt: skip
    assert result.plan.weights
    bare = CalibrationStats(gram=stats.gram, tokens=200)
    with pytest.raises(ConfigError, match="output_gram"):
        compress(source, tmp_path / "b.onnx", method="whiten", ratio=0.6, min_size=0,
                 stats=bare, loss_aware=True)  # fmt: skip


def test_statistics_for_prefers_the_full_gram_and_only_for_whitening() -> None:
    stats = _stats()
    found = statistics_for(stats, "whiten", "k.weight")
    assert found["output_gram"] is stats.output_gram["k.weight"] and found["output_weight"] is None
    no_full = CalibrationStats(gram=stats.gram, output_fisher=stats.output_fisher)
    found = statistics_for(no_full, "drone", "k.weight")
    assert found["output_gram"] is None and found["output_weight"] is not None
    assert statistics_for(stats, "svd", "k.weight")["output_gram"] is None


def test_output_gram_survives_save_and_load(tmp_path: Path) -> None:
    stats = _stats()
    again = CalibrationStats.load(stats.save(tmp_path / "s.npz"))
    assert set(again.output_gram) == set(MEMBERS)
    for name in MEMBERS:
        np.testing.assert_array_equal(again.output_gram[name], stats.output_gram[name])
