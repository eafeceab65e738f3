"""Bounded-memory compress: external weights are read one at a time and factors spilled to disk.

The streaming path (an input with external data) must give exactly the in-memory path's model,
and must never map the input's data file whole nor hold more than one weight (one Q/K/V group)
of the input at a time, nor keep any of it after compress returns.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from factorlm import streaming
from factorlm.calibration import CalibrationStats
from factorlm.compression import compress
from factorlm.options import CompressOptions, replace
from models import run_ort

OPTIONS = CompressOptions(
    method="whiten", ratio=0.6, min_size=0, rank_multiple=4, embeddings=0.5, joint_qkv=True
)


def _weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))  # loads external data too
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _feeds() -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(1).integers(0, 64, size=(2, 7), dtype=np.int64)}


@pytest.mark.parametrize("method", ["whiten", "svd", "kron", "losparse"])
def test_streaming_equals_in_memory(
    tmp_path: Path, block_models: tuple[Path, Path], block_stats: CalibrationStats, method: str
) -> None:
    inline, external = block_models
    opts = CompressOptions(
        method=method, ratio=0.6, min_size=0, rank_multiple=4, embeddings=0.5,
        sparse_density=0.05,
    )  # fmt: skip
    stats = block_stats if method == "whiten" else None
    a = compress(inline, tmp_path / "a" / "model.onnx", opts, stats=stats)
    b = compress(external, tmp_path / "b" / "model.onnx", opts, stats=stats)
    assert a.factorized == b.factorized > 0
    assert a.plan.to_json() == b.plan.to_json()
    # In-memory input -> embedded output; external input -> external output.
    assert [p.name for p in a.output_paths] == ["model.onnx"]
    assert [p.name for p in b.output_paths] == ["model.onnx", "model.onnx.data"]
    wa, wb = _weights(a.output_paths[0]), _weights(b.output_paths[0])
    assert wa.keys() == wb.keys()
    for name, array in wa.items():
        np.testing.assert_array_equal(wb[name], array, err_msg=name)
    ya, yb = (
        run_ort(str(a.output_paths[0]), _feeds())[0],
        run_ort(str(b.output_paths[0]), _feeds())[0],
    )
    np.testing.assert_array_equal(ya, yb)
    ref = run_ort(str(inline), _feeds())[0]
    assert np.linalg.norm(yb - ref) < np.linalg.norm(ref)
    # Nothing staged is left beside the output (spill file, save stage).
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "model.onnx",
        "model.onnx.data",
        "model.plan.json",
    ]


def test_no_input_weight_is_held_twice_or_kept(
    tmp_path: Path,
    block_models: tuple[Path, Path],
    block_stats: CalibrationStats,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Count every read of the input's data file: never a whole-file map, never more than one
    weight's worth (a Q/K/V group: 3 tensors) alive at once, nothing alive after compress."""
    _, external = block_models
    data_file = str(external.parent / "weights.bin")
    live: list[weakref.ref[np.ndarray]] = []
    most = 0
    reads = 0
    original_read = streaming.WeightRef.read

    def counting_read(self: streaming.WeightRef) -> np.ndarray:
        nonlocal most, reads
        array = original_read(self)
        if self.path == data_file:
            gc.collect()
            live[:] = [r for r in live if r() is not None]
            live.append(weakref.ref(array))
            reads += 1
            most = max(most, len(live))
        return array

    def whole_file_map(self: ir.ExternalTensor) -> None:
        raise AssertionError(f"{self.name}: the whole external data file was mapped")

    monkeypatch.setattr(streaming.WeightRef, "read", counting_read)
    monkeypatch.setattr(ir.ExternalTensor, "_load", whole_file_map)
    result = compress(external, tmp_path / "o" / "model.onnx", OPTIONS, stats=block_stats)
    assert result.factorized >= 3
    gc.collect()
    assert reads >= 2 * result.factorized  # planning and factorizing read every weight
    assert 1 <= most <= 3, most
    assert all(r() is None for r in live)


def test_streamed_output_keeps_its_weights_external(
    tmp_path: Path, block_models: tuple[Path, Path]
) -> None:
    """Factors are external in the output, the replaced originals are gone, tiny tensors inline."""
    _, external = block_models
    result = compress(external, tmp_path / "o" / "model.onnx", replace(OPTIONS, method="svd"))
    proto = onnx.load(str(result.output_paths[0]), load_external_data=False)
    stored = {t.name: t for t in proto.graph.initializer}
    assert onnx.external_data_helper.uses_external_data(stored["flat"]) is False  # 16 bytes
    factors = [n for n in stored if "factorlm" in n and 4 * np.prod(stored[n].dims) > 1024]
    assert factors and all(
        onnx.external_data_helper.uses_external_data(stored[n]) for n in factors
    )  # save_model's threshold: tensors above 1 KiB go to external data
    assert not any(n in stored for n in ("q.weight", "up.weight", "embed.weight"))
