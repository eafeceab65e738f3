"""``factorlm compress --ray`` end to end: calibration Grams gathered by Ray workers.

The CLI collects the statistics through ``collect_requested``, which shards the calibration set
over the test cluster's CPUs and adds the Grams, then factorizes the weights as Ray tasks, both
in one Ray session; the compressed model must match the local run up to the rounding of that sum.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from factorlm import cli
from factorlm.planning import load_plan
from tiny_vocab import LONG_TEXTS

TEXTS = LONG_TEXTS * 6


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_ray_calibration_compress_matches_local(
    ray_cluster: Any,
    tiny_llama_past: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="factorlm.calibration.capture")
    caplog.set_level(logging.INFO, logger="factorlm.distributed")
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    outputs = {}
    for run, extra in (("ray", ["--ray", ray_cluster.address]), ("local", [])):
        monkeypatch.setenv("FACTORLM_CACHE", str(tmp_path / f"cache-{run}"))  # no shared stats
        out = tmp_path / run / "model.onnx"
        argv = [
            "compress", str(tiny_llama_past), "-o", str(out), "--data", str(data),
            "--ratio", "0.5", "--min-size", "256", "--rank-multiple", "4", "--max-length", "16",
            "--batch-size", "3", "--shrinkage", "auto", *extra,
        ]  # fmt: skip
        assert cli.main(argv) == 0
        assert any((tmp_path / f"cache-{run}" / "calibration").glob("stats-*.npz"))
        outputs[run] = out
    assert sum("on 2 Ray workers" in r.getMessage() for r in caplog.records) == 1
    # calibration and factorization ran in one Ray session: one connection for the whole call
    assert sum(r.getMessage().startswith("Ray started") for r in caplog.records) == 1
    ray_plan = load_plan(outputs["ray"].with_name("model.plan.json"))
    local_plan = load_plan(outputs["local"].with_name("model.plan.json"))
    assert ray_plan.weights and ray_plan.weights.keys() == local_plan.weights.keys()
    for name, entry in local_plan.weights.items():  # same ranks; errors up to the Gram rounding
        assert ray_plan.weights[name].rank == entry.rank
        assert ray_plan.weights[name].expected_error == pytest.approx(entry.expected_error, 1e-6)
    a, b = _weights(outputs["local"]), _weights(outputs["ray"])
    assert a.keys() == b.keys()
    for name, value in a.items():  # a factor pair's singular vectors may flip sign together
        scale = np.abs(value).max()
        np.testing.assert_allclose(np.abs(b[name]), np.abs(value), rtol=1e-4, atol=1e-5 * scale)
