"""Model arguments: an existing path, else a model id in the local Hugging Face cache (offline).

Why: ``factorlm export sentence-transformers/all-MiniLM-L6-v2 -o out`` should work when that model
is already in ``~/.cache/huggingface`` without the user digging out the snapshot folder, and it
must never reach the network. Anything else is refused with one sentence.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from factorlm.errors import ModelLoadError

__all__ = ["resolve_model", "resolve_onnx"]

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
#: Where an ONNX file sits in a hub snapshot (optimum's and most ONNX repos' layouts).
_ONNX_NAMES = ("model.onnx", "onnx/model.onnx")


def _from_hf_cache(name: str) -> Path | None:
    if not _REPO_ID.fullmatch(name) or name.endswith((".onnx", ".ort", ".plan")):
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a transformers dependency
        return None
    try:
        folder = snapshot_download(name, local_files_only=True)
    except (OSError, ValueError) as exc:  # not cached, or not a valid repo id
        logger.debug("%s is not in the local Hugging Face cache: %s", name, exc)
        return None
    logger.info("Using %s from the local Hugging Face cache: %s", name, folder)
    return Path(folder)


def resolve_model(value: str | Path, what: str = "model") -> Path:
    """``value`` if it exists, else its snapshot folder in the local HF cache; else one sentence."""
    path = Path(value)
    if path.exists():
        return path
    folder = _from_hf_cache(str(value))
    if folder is not None:
        return folder
    raise ModelLoadError(
        f"The {what} {value} is neither a file or folder nor a model id in the local Hugging "
        "Face cache (nothing is downloaded: run `hf download ID` first to use a hub model)."
    )


def resolve_onnx(value: str | Path, what: str = "model") -> Path:
    """An ONNX model path, or the ``model.onnx`` of a folder or of a cached hub snapshot."""
    path = resolve_model(value, what)
    if path.is_dir():
        for name in _ONNX_NAMES:
            if (path / name).is_file():
                return path / name
        raise ModelLoadError(f"The {what} folder {path} holds no model.onnx.")
    return path
