"""The build's bounded-memory optimizer and writer give exactly what ONNX Runtime and onnx give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from factorlm.exporters.ort.optimize import optimize_transformer, save_optimized, write_proto

KWARGS = {"model_type": "bert", "num_heads": 4, "hidden_size": 32, "use_gpu": False}


def test_optimize_transformer_equals_ort_optimize_model(tiny_bert: Path, tmp_path: Path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model
    from shape_infer_helper import SymbolicShapeInferenceHelper

    ours = optimize_transformer(tiny_bert, **KWARGS)
    theirs = optimize_model(str(tiny_bert), **KWARGS)
    ops = {n.op_type for n in ours.model.graph.node}
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization"} <= ops
    assert ours.model.SerializeToString() == theirs.model.SerializeToString()
    # the weightless shape inference is undone after the call
    assert "_preprocess" not in SymbolicShapeInferenceHelper.__dict__
    save_optimized(ours, tmp_path / "ours.onnx")
    theirs.save_model_to_file(str(tmp_path / "theirs.onnx"))
    assert (tmp_path / "ours.onnx").read_bytes() == (tmp_path / "theirs.onnx").read_bytes()


def test_write_proto_writes_the_bytes_onnx_writes(tiny_bert: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_bert))
    big = np.random.default_rng(0).standard_normal((700, 600)).astype(np.float32)  # > 1 MiB
    model.graph.initializer.append(onnx.numpy_helper.from_array(big, "unused_big"))
    model.metadata_props.add(key="note", value="ü")
    write_proto(model, tmp_path / "streamed.onnx")
    onnx.save_model(model, str(tmp_path / "whole.onnx"))
    assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "whole.onnx").read_bytes()
