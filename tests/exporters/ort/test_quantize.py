"""int8 engines quantize every constant MatMul weight, factor matrices included, and say so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from factorlm.exporters.ort import build_ort_engine, constant_matmul_weights
from models import run_ort

from ..engine_models import cosine, factorized_mlp, run_engine


def test_factor_matrices_are_int8_quantized_and_counted(tmp_path: Path) -> None:
    model = factorized_mlp()
    src = tmp_path / "factorized.onnx"
    onnx.save(model, src)
    assert constant_matmul_weights(model) == {
        "fc1.weight.factorlm_left": True,
        "fc1.weight.factorlm_right": True,
        "fc2.weight.factorlm_left": True,
        "fc2.weight.factorlm_right": True,
    }
    manifest = build_ort_engine(src, tmp_path / "int8", int8=True)
    q = manifest.quantization
    assert q is not None
    assert (q["weights"], q["quantized"], q["factor_weights"], q["factor_quantized"]) == (
        4,
        4,
        4,
        4,
    )
    assert q["unquantized"] == []
    engine = onnx.load(str(manifest.engine_path))
    assert constant_matmul_weights(engine) == {}  # no float MatMul weight left anywhere
    assert (
        manifest.fusions["engine"]["MatMulInteger"]
        + manifest.fusions["engine"]["DynamicQuantizeMatMul"]
        == 4
    )
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 8, 32)).astype(np.float32)}
    cos = cosine(run_engine(tmp_path / "int8", feeds)[0], run_ort(model, feeds)[0])
    print(f"factorized MLP int8 cosine: {cos:.6f}")
    assert cos > 0.9999
