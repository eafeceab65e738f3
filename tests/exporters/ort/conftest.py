"""A plain MLP model file in its own folder, for builds that need no transformer."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import mlp, write_model


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    return write_model(mlp(), tmp_path / "src" / "mlp.onnx")
