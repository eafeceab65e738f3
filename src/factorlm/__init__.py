"""factorlm: low-rank factorization of transformer language models, compiled into engines."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
