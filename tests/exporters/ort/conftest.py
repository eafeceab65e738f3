"""A plain MLP model file in its own folder, for builds that need no transformer."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from models import mlp


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "mlp.onnx"
    path.parent.mkdir()
    onnx.save(mlp(), path)
    return path
