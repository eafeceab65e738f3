"""Planning totals span every targeted weight; compress reuses the planner's eigendecompositions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from factorlm.compress import compress
from factorlm.decompose import decompose
from factorlm.passes import analyze
from factorlm.planning import Plan, make_plan, validate_plan
from models import mlp, run_ort


@dataclass
class _Stats:
    gram: dict[str, np.ndarray] = field(default_factory=dict)
    mean_abs: dict[str, np.ndarray] = field(default_factory=dict)
    fisher: dict[str, np.ndarray] = field(default_factory=dict)


def _stats(model: onnx.ModelProto) -> _Stats:
    rng = np.random.default_rng(7)
    stats = _Stats()
    for init in model.graph.initializer:
        if init.name.endswith(".weight"):
            m, n = numpy_helper.to_array(init).shape
            x = rng.standard_normal((4 * m, m)) * rng.uniform(0.2, 2.0, m)
            stats.gram[init.name] = x.T @ x
            stats.mean_abs[init.name] = np.abs(x).mean(axis=0)
            stats.fisher[init.name] = rng.uniform(0.1, 1.0, n)
    return stats


def _model() -> onnx.ModelProto:
    # fc1 32x96 (break-even 24), fc2 96x48 (break-even 32): at 0.55 one of them may stay dense.
    return mlp(32, 96, 48, seed=3, decay=0.05)


@pytest.mark.parametrize("allocation", ["optimal", "lagrangian", "greedy", "uniform"])
@pytest.mark.parametrize("ratio", [0.9, 0.55])
def test_totals_cover_factorized_and_dense_weights(allocation: str, ratio: float) -> None:
    analysis = analyze(ir.from_proto(_model()))
    plan = make_plan(analysis, ratio=ratio, allocation=allocation)
    targeted = {c.name: c.shape[0] * c.shape[1] for c in analysis.candidates}
    assert set(plan.weights) | set(plan.dense) == set(targeted)
    assert not set(plan.weights) & set(plan.dense)
    totals = plan.totals()
    assert totals["params_before"] == sum(targeted.values())
    after = sum(w.params_after for w in plan.weights.values())
    after += sum(targeted[name] for name in plan.dense)
    assert totals["params_after"] == after
    assert totals["params_after"] <= ratio * totals["params_before"]
    assert totals["flops_after"] <= totals["flops_before"]
    again = Plan.from_json(plan.to_json())
    assert again.dense == plan.dense and again.totals() == totals
    assert validate_plan(again, analysis).totals() == totals


def test_a_user_plan_that_factorizes_a_dense_weight_drops_it_from_dense() -> None:
    analysis = analyze(ir.from_proto(_model()))
    plan = make_plan(analysis, ratio=0.9)
    assert plan.dense, "ratio 0.9 leaves a weight dense"
    name = next(iter(plan.dense))
    edited = Plan.from_json(plan.to_json())
    source = make_plan(analysis, ratio=0.5).weights[name]
    edited.weights[name] = source
    checked = validate_plan(edited, analysis)
    assert name not in checked.dense
    assert checked.totals()["params_before"] == plan.totals()["params_before"]


@pytest.mark.parametrize("method", ["svd", "whiten", "asvd", "fwsvd"])
def test_compress_factors_equal_exact_decompose(tmp_path: Path, method: str) -> None:
    """The reused eigendecompositions give the exact-SVD factors of every planned weight."""
    model = _model()
    source = tmp_path / "in.onnx"
    onnx.save(model, source)
    stats = _stats(model) if method != "svd" else None
    result = compress(
        source, tmp_path / "out.onnx", method=method, ratio=0.5, min_size=0, stats=stats
    )
    assert result.params_after <= 0.5 * result.params_before
    assert result.params_before == 32 * 96 + 96 * 48
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    x = np.random.default_rng(1).standard_normal((2, 5, 32)).astype(np.float32)
    h = x.astype(np.float64)
    for layer in ("fc1", "fc2"):
        name = f"{layer}.weight"
        w = weights[name]
        entry = result.plan.weights.get(name)
        if entry is not None:
            extra = {}
            if stats is not None:
                extra = {
                    "gram": stats.gram[name],
                    "mean_abs": stats.mean_abs[name],
                    "fisher": stats.fisher[name],
                }
            w = decompose(w, method, int(entry.rank), svd_method="exact", **extra).reconstruct()
        h = h @ w.astype(np.float64) + weights[f"{layer}.bias"]
        if layer == "fc1":
            h = np.maximum(h, 0.0)
    (got,) = run_ort(str(tmp_path / "out.onnx"), {"x": x})
    np.testing.assert_allclose(got, h, rtol=1e-4, atol=1e-4 * np.abs(h).max())
