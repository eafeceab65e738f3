"""``compress --ray``: per-weight factorizations as Ray tasks on a two-node test cluster.

Each task reads its weight from the input's external data by offset and returns only the
factors; the output must be bit-identical to the local path. Without Ray, one sentence names
the extra to install.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from factorlm.calibration import CalibrationStats
from factorlm.compression import compress
from factorlm.errors import ConfigError
from factorlm.options import CompressOptions


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_missing_ray_names_the_extra(
    tmp_path: Path, block_models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    _, external = block_models
    opts = CompressOptions(method="svd", min_size=0, ray_address="local")
    with pytest.raises(ConfigError, match=r"pip install 'factorlm\[ray\]'"):
        compress(external, tmp_path / "o" / "model.onnx", opts)


def test_ray_flag_takes_an_optional_address() -> None:
    typer_main = pytest.importorskip("typer.main")
    from factorlm.cli import app
    from factorlm.cli._flags import fill_optional_values

    command = typer_main.get_command(app).commands["compress"]  # type: ignore[attr-defined]
    for argv, expected in (
        (["m.onnx", "-o", "out"], None),
        (["m.onnx", "-o", "out", "--ray"], "auto"),
        (["m.onnx", "--ray", "-o", "out"], "auto"),
        (["m.onnx", "-o", "out", "--ray", "ray://head:10001"], "ray://head:10001"),
        (["m.onnx", "-o", "out", "--ray-address", "local"], "local"),
    ):
        ctx = command.make_context("compress", fill_optional_values(argv))
        assert ctx.params["ray_address"] == expected, argv


@pytest.mark.parametrize("method", ["whiten", "kron"])
def test_ray_compress_is_bit_identical_to_local(
    ray_cluster: Any,
    tmp_path: Path,
    block_models: tuple[Path, Path],
    block_stats: CalibrationStats,
    method: str,
) -> None:
    ray = pytest.importorskip("ray")
    _, external = block_models
    opts = CompressOptions(method=method, ratio=0.6, min_size=0, rank_multiple=4, embeddings=0.5)
    stats = block_stats if method == "whiten" else None
    local = compress(external, tmp_path / "local" / "model.onnx", opts, stats=stats)
    address = ray_cluster.address
    remote = compress(
        external,
        tmp_path / "ray" / "model.onnx",
        CompressOptions(**{**opts.__dict__, "ray_address": address}),
        stats=stats,
    )
    assert not ray.is_initialized()  # the session compress started is shut down again
    assert remote.plan.to_json() == local.plan.to_json()
    a, b = _weights(local.output_paths[0]), _weights(remote.output_paths[0])
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert local.output_paths[0].read_bytes() == remote.output_paths[0].read_bytes()
