"""Real pretrained models and texts, prepared once into a cache by ``factorlm assets``.

Why: tests, benchmarks and the default run must work offline on real weights and real data.
The helpers here only *find* prepared assets (cheap imports); preparation lives in
:mod:`factorlm.assets.prepare`; :func:`exported_minilm` exports all-MiniLM-L6-v2 to ONNX once
and shares the result between every caller.
"""

from __future__ import annotations

import logging
from pathlib import Path

from factorlm._common.files import EXPORT_RECORD
from factorlm.assets.paths import (
    ASSET_NAMES,
    austen_dir,
    cache_root,
    minilm_dir,
    reviews_path,
    smollm_dir,
)

__all__ = [
    "ASSET_NAMES",
    "austen_dir",
    "cache_root",
    "exported_minilm",
    "minilm_dir",
    "reviews_path",
    "smollm_dir",
]

logger = logging.getLogger(__name__)


def exported_minilm(root: Path | None = None) -> Path:
    """``model.onnx`` of all-MiniLM-L6-v2 (feature-extraction), exported once into the cache.

    The export is validated against PyTorch and lands in ``<cache>/onnx/all-MiniLM-L6-v2/`` with
    its tokenizer and config; concurrent callers wait on a lock instead of exporting twice.
    """
    from factorlm.assets.prepare import file_lock
    from factorlm.exporters.hf import export

    base = cache_root(root)
    target = base / "onnx" / "all-MiniLM-L6-v2"
    model = target / "model.onnx"
    if model.is_file():
        if not (target / EXPORT_RECORD).is_file():  # exported by a factorlm without the record
            from factorlm.exporters.hf import write_export_record

            write_export_record(target, minilm_dir(root), task="feature-extraction")
        return model
    source = minilm_dir(root)
    with file_lock(base / ".locks" / "onnx-minilm.lock"):
        if not model.is_file():
            logger.info("Exporting %s to %s", source, target)
            export(source, target, task="feature-extraction", progress=False)
    return model
