"""Where the prepared real assets live in the cache, and the checks that they are complete.

Why a separate module: tests, benchmarks and the pipeline only need to *find* assets; they must
not pay for importing the preparation code (pip, apt, transformers).
"""

from __future__ import annotations

import logging
from pathlib import Path

from factorlm._common.files import cache_root
from factorlm.errors import DataError

__all__ = [
    "ASSET_NAMES",
    "COMPLETE_MARKER",
    "asset_dir",
    "austen_dir",
    "cache_root",
    "minilm_dir",
    "require",
    "reviews_path",
    "smollm_dir",
]

logger = logging.getLogger(__name__)

#: Marker file written last into an asset's folder once every file is in place.
COMPLETE_MARKER = ".factorlm-complete"

#: Asset name -> folder relative to the cache root.
_LAYOUT: dict[str, str] = {
    "minilm": "models/all-MiniLM-L6-v2",
    "smollm": "models/SmolLM2-135M-Instruct",
    "reviews": "data/rotten_tomatoes",
    "austen": "data/austen",
}
ASSET_NAMES: tuple[str, ...] = tuple(_LAYOUT)


def asset_dir(name: str, root: Path | None = None) -> Path:
    """The folder of asset ``name`` under the cache root (prepared or not)."""
    if name not in _LAYOUT:
        raise DataError(f"Unknown asset {name!r}; known assets are {', '.join(ASSET_NAMES)}.")
    return cache_root(root) / _LAYOUT[name]


def require(name: str, root: Path | None = None) -> Path:
    """The folder of a prepared asset; ``DataError`` naming the command to run if missing."""
    folder = asset_dir(name, root)
    if not (folder / COMPLETE_MARKER).is_file():
        raise DataError(
            f"The asset {name!r} is not prepared in {cache_root(root)}; "
            f"run `factorlm assets {name}` first."
        )
    return folder


def minilm_dir(root: Path | None = None) -> Path:
    """Hugging Face folder of all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    return require("minilm", root)


def smollm_dir(root: Path | None = None) -> Path:
    """fp32 Hugging Face folder of SmolLM2-135M-Instruct, converted from its GGUF file."""
    return require("smollm", root)


def reviews_path(root: Path | None = None) -> Path:
    """JSONL of Rotten Tomatoes snippets: ``{"text", "label" (fresh|rotten|plot), "movie"}``."""
    return require("reviews", root) / "reviews.jsonl"


def austen_dir(root: Path | None = None) -> Path:
    """Folder with one ``<novel>.txt`` per Jane Austen novel (e.g. ``prideprejudice.txt``)."""
    return require("austen", root)
