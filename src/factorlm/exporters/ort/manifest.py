"""The engine manifest: what an engine directory holds, what it was built from and how.

Why separate: the benchmark, the TensorRT builder and the pipeline read and write manifests
without needing the ONNX Runtime build code.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from factorlm._common.files import sha256_file, write_text_atomic
from factorlm._common.outputs import check_output
from factorlm.errors import ConfigError

__all__ = ["MANIFEST_NAME", "EngineManifest", "check_output_dir", "source_info"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class EngineManifest:
    """What an engine directory holds; saved as ``manifest.json`` next to the engine."""

    backend: str
    engine: str
    source: dict[str, Any]
    options: dict[str, Any]
    versions: dict[str, str]
    providers: list[str]
    session: dict[str, Any]
    fusions: dict[str, dict[str, int]]
    sizes: dict[str, int]
    model_type: str | None = None
    quantization: dict[str, Any] | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    directory: str = ""

    @property
    def engine_path(self) -> Path:
        """Absolute path of the engine file."""
        return Path(self.directory) / self.engine

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``directory`` is where it was loaded from, so it is not stored)."""
        data = asdict(self)
        data.pop("directory")
        return data

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``manifest.json`` into ``directory`` (atomically) and return its path."""
        path = Path(directory) / MANIFEST_NAME
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> EngineManifest:
        """Read the manifest of an engine directory."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ConfigError(f"{directory} is not an engine directory (no {MANIFEST_NAME}).")
        try:
            data = json.loads(path.read_text())
            return cls(**data, directory=str(Path(directory).resolve()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"{path} is not a valid engine manifest ({exc}).") from exc


def _external_files(model: onnx.ModelProto, base: Path) -> list[Path]:
    """External data files referenced by ``model`` (loaded without its data), relative to ``base``."""
    names: set[str] = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    names.add(entry.value)
    return [base / name for name in sorted(names)]


def source_info(path: Path, model: onnx.ModelProto) -> dict[str, Any]:
    """Hash and size of a model file and its external data, for manifests."""
    external = _external_files(model, path.parent)
    return {
        "path": str(path.resolve()),
        "sha256": sha256_file(path),
        "external_data": {p.name: sha256_file(p) for p in external if p.is_file()},
        "bytes": path.stat().st_size + sum(p.stat().st_size for p in external if p.is_file()),
    }


def check_output_dir(source: Path, out: Path, *, overwrite: bool = False) -> None:
    """Refuse an engine folder that would harm the source or a folder factorlm did not write.

    ``_common.outputs.check_output``: not a file, not containing the source, not non-empty
    without ``overwrite``, not someone else's folder even with it, parent a writable folder.
    """
    check_output(out, inputs=[source], overwrite=overwrite, kind="folder", what="output directory")
