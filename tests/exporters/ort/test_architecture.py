"""The architecture and attention dimensions come from config.json, else from the graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from factorlm.exporters.ort import build_ort_engine, detect_model_type, infer_attention_dims
from models import mlp


def test_model_type_and_dims_are_inferred_from_the_graph_alone(
    tiny_bert: Path, tmp_path: Path
) -> None:
    alone = tmp_path / "alone" / "model.onnx"
    alone.parent.mkdir()
    shutil.copy(tiny_bert, alone)  # no config.json beside it
    header = onnx.load(str(alone), load_external_data=False)
    assert detect_model_type(header) == "bert"
    assert infer_attention_dims(header) == (4, 32)
    assert detect_model_type(header, {"model_type": "llama"}) == "llama"
    assert detect_model_type(onnx.load(str(alone)), {"model_type": "t5"}) == "bert"  # falls back
    assert detect_model_type(mlp()) is None
    manifest = build_ort_engine(alone, tmp_path / "engine")
    assert manifest.fusions["engine"]["Attention"] == 2 and manifest.files == []
