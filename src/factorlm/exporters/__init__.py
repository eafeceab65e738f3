"""Exporters: Hugging Face -> ONNX (``hf``), and engines built from ONNX by other modules.

Why no eager imports here: each exporter pulls a heavy optional stack (optimum/torch, ORT,
TensorRT); importing ``factorlm.exporters`` must stay cheap, so callers import the submodule.
"""

from __future__ import annotations

import logging

__all__: list[str] = []

logger = logging.getLogger(__name__)
