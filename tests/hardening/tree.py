"""Snapshots of a folder tree: what the hardening tests compare before and after a command."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["snapshot"]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` -> sha256 (files), ``dir`` or ``link:<target>``."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"link:{path.readlink()}"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
