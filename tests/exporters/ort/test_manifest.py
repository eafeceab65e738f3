"""An engine's manifest records its source (hash untouched), options, versions and sizes."""

from __future__ import annotations

import json
from pathlib import Path

from factorlm._common.files import sha256_file
from factorlm.exporters.ort import EngineManifest, build_ort_engine


def test_manifest_records_source_options_versions_and_sizes(mlp_path: Path, tmp_path: Path) -> None:
    before = sha256_file(mlp_path)
    out = tmp_path / "engine"
    manifest = build_ort_engine(mlp_path, out)
    data = json.loads((out / "manifest.json").read_text())
    assert data["source"]["sha256"] == before == sha256_file(mlp_path)  # input untouched
    assert data["backend"] == "ort" and data["providers"] == ["CPUExecutionProvider"]
    assert data["versions"]["onnxruntime"] and data["versions"]["onnx"]
    assert data["session"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert data["sizes"]["engine_bytes"] == (out / "model.onnx").stat().st_size
    assert data["inputs"][0]["name"] == "x" and data["outputs"] == ["y"]
    assert EngineManifest.load(out) == manifest
    assert oct(out.stat().st_mode & 0o777) == "0o755"
