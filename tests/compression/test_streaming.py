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


def test_external_constant_attributes_are_carried(
    tmp_path: Path, block_models: tuple[Path, Path]
) -> None:
    """Exporters of models above 2 GB put ``Constant`` values in the data file too: the output
    must not point at the input's data file for them (the checker refused it), and it computes
    what the same compression of the embedded model computes."""
    proto = onnx.load(str(block_models[0]))
    flat = next(t for t in proto.graph.initializer if t.name == "flat")
    want = numpy_helper.to_array(flat)
    proto.graph.initializer.remove(flat)
    proto.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["flat"], value=flat))
    inline = tmp_path / "const_inline" / "model.onnx"
    inline.parent.mkdir()
    onnx.save_model(proto, str(inline))
    onnx.external_data_helper.convert_model_to_external_data(
        proto, location="weights.bin", size_threshold=0, convert_attribute=True
    )
    external = tmp_path / "const_external" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(proto, str(external))
    stored = onnx.load(str(external), load_external_data=False).graph.node[0].attribute[0].t
    assert onnx.external_data_helper.uses_external_data(stored)  # the case under test

    opts = replace(OPTIONS, method="svd")
    a = compress(inline, tmp_path / "a" / "model.onnx", opts)
    b = compress(external, tmp_path / "b" / "model.onnx", opts)
    out = onnx.load(str(b.output_paths[0]), load_external_data=False)
    value = next(n for n in out.graph.node if n.output[0] == "flat").attribute[0].t
    assert not onnx.external_data_helper.uses_external_data(value)
    np.testing.assert_array_equal(numpy_helper.to_array(value), want)
    np.testing.assert_array_equal(
        run_ort(str(b.output_paths[0]), _feeds())[0], run_ort(str(a.output_paths[0]), _feeds())[0]
    )
