"""factorlm: low-rank factorization of transformer language models, compiled into engines.

The Python API mirrors the CLI: ``factorlm.export``, ``factorlm.compress``, ``factorlm.build``,
``factorlm.benchmark`` and ``factorlm.run``. They are imported lazily so that ``import factorlm``
stays cheap (no torch, no onnxruntime until a verb is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "benchmark", "build", "compress", "export", "run"]


def __getattr__(name: str) -> Any:
    if name == "export":
        from factorlm.exporters.hf import export

        return export
    if name in ("build", "run"):
        return getattr(importlib.import_module("factorlm.api"), name)
    if name in ("compress", "benchmark"):  # callable modules, see factorlm._callable
        return importlib.import_module(f"factorlm.{name}")
    raise AttributeError(f"module 'factorlm' has no attribute {name!r}")
