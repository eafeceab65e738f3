"""``factorlm compress --stats FILE`` maps the statistics file instead of reading it whole.

The pipeline's compress stage maps its statistics (``CalibrationStats.load(mmap=True)``) so a
large model's Grams cost no memory up front; the CLI must do the same, and the mapped path must
write exactly the model the read-whole path writes.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import factorlm.compression
from factorlm import cli
from factorlm.calibration import CalibrationStats
from factorlm.compression import compress
from factorlm.options import CompressOptions
from models import mlp, write_model


def _mapped(array: np.ndarray) -> bool:
    """Whether ``array`` is a view of a memory map (its base chain ends in an mmap)."""
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer over a map
        base = base.obj
    return isinstance(base, mmap.mmap)


@pytest.mark.parametrize("method", ["whiten", "asvd"])
def test_stats_file_is_mapped_and_gives_the_read_whole_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    model = write_model(mlp(seed=3, decay=0.05), tmp_path / "in" / "model.onnx")
    rng = np.random.default_rng(0)
    gram, mean_abs = {}, {}
    for name, n in (("fc1.weight", 32), ("fc2.weight", 64)):
        x = rng.standard_normal((4 * n, n)) * np.linspace(0.2, 2.0, n)
        gram[name], mean_abs[name] = x.T @ x, np.abs(x).mean(axis=0)
    stats_file = tmp_path / "stats.npz"
    CalibrationStats(gram=gram, mean_abs=mean_abs, tokens=256).save(stats_file)

    seen: list[bool] = []
    real = factorlm.compression.compress

    def spy(*args: Any, **kwargs: Any) -> Any:  # the real compress; records what it was given
        stats = kwargs["stats"]
        seen.extend(_mapped(a) for a in [*stats.gram.values(), *stats.mean_abs.values()])
        return real(*args, **kwargs)

    monkeypatch.setattr(factorlm.compression, "compress", spy)
    out = tmp_path / "cli" / "model.onnx"
    argv = [
        "compress", str(model), "-o", str(out), "--stats", str(stats_file), "--method", method,
        "--ratio", "0.6", "--min-size", "0", "--rank-multiple", "4",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert seen and all(seen)  # every array the CLI handed over is a view of the mapped file

    whole = CalibrationStats.load(stats_file)  # read whole
    assert not any(_mapped(a) for a in whole.gram.values())
    opts = CompressOptions(method=method, ratio=0.6, min_size=0, rank_multiple=4)
    local = compress(model, tmp_path / "api" / "model.onnx", opts, stats=whole)
    assert local.factorized == 2
    assert out.read_bytes() == local.output_paths[0].read_bytes()
    plan = out.with_name("model.plan.json").read_text()
    assert plan == local.plan_path.read_text()
