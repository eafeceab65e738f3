"""Fixtures for the benchmark tests: tiny models in export-style folders, data files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bench_models import encoder, labelled_texts, save_tokenizer


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Export-style folders: reference (with tokenizer), a noisy copy, a deliberately slow copy."""
    root = tmp_path_factory.mktemp("bench_models")
    ref = root / "ref"
    encoder(ref / "model.onnx")
    save_tokenizer(ref)
    encoder(root / "noisy" / "model.onnx", weight_noise=0.05)
    encoder(root / "slow" / "model.onnx", heavy=2)
    encoder(root / "typed" / "model.onnx", with_token_types=True)
    encoder(root / "renamed" / "model.onnx", output_name="hidden")
    return {p.name: p for p in root.iterdir()}


@pytest.fixture(scope="session")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench_data") / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in labelled_texts(120)) + "\n")
    return path
