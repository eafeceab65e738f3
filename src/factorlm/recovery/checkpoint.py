"""Training checkpoints: write-then-rename saves, ``weights_only`` loads, RNG state as tensors.

A checkpoint holds the student, optimizer, step, method state and RNG states, so a run
interrupted after its last checkpoint and resumed reaches the same weights as an uninterrupted
one. It is loaded with ``weights_only=True``: a planted pickle cannot run code.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from factorlm.errors import ConfigError, ModelLoadError
from factorlm.recovery.settings import TrainConfig

__all__ = [
    "CHECKPOINT",
    "RESUME_KEYS",
    "check_resumable",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: Config fields a resumed run must share with its checkpoint.
RESUME_KEYS = (
    "method", "steps", "batch_size", "max_length", "lr", "seed", "feature_fraction",
    "temperature", "lm_weight",
)  # fmt: skip


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """The three RNG states as tensors and plain numbers only, so ``weights_only`` loads them."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(list(internal), dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
    }


def set_rng_state(rng: dict[str, Any], path: Path) -> None:
    """Restore what ``rng_state`` stored; a malformed entry is one sentence, not a traceback."""
    try:
        torch.set_rng_state(rng["torch"])
        n = rng["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (str(n["name"]), keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
        )
        p = rng["python"]
        state = tuple(int(v) for v in p["state"].tolist())
        random.setstate((int(p["version"]), state, p["gauss_next"]))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise ModelLoadError(
            f"checkpoint {path} holds a malformed RNG state ({exc}); delete it or run without "
            "--resume."
        ) from None


#: Keys every checkpoint holds, with the types ``train`` relies on.
_PAYLOAD_TYPES: dict[str, type | tuple[type, ...]] = {
    "config": dict, "student": dict, "optimizer": dict, "method_state": dict, "step": int,
    "seconds": (int, float), "losses": list, "rng": dict,
}  # fmt: skip


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, so a
    planted file cannot run code; anything else is refused in one sentence."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol ..." is noise here
            payload = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ModelLoadError(
            f"checkpoint {path} holds objects other than tensors and plain values (a pickle "
            "that could run code), so it was not loaded; delete it or run without --resume."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError) as exc:
        raise ModelLoadError(
            f"checkpoint {path} is truncated or not a factorlm checkpoint "
            f"({type(exc).__name__}); delete it or run without --resume."
        ) from None
    if not isinstance(payload, dict):
        raise ModelLoadError(f"checkpoint {path} is not a factorlm checkpoint; delete it.")
    for key, kind in _PAYLOAD_TYPES.items():
        if not isinstance(payload.get(key), kind):
            raise ModelLoadError(
                f"checkpoint {path} lacks a valid {key!r} entry; delete it or run without --resume."
            )
    return payload


def check_resumable(payload: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuse a checkpoint made with settings that change what the steps do."""
    saved = payload["config"]
    for key in RESUME_KEYS:
        if saved.get(key) != getattr(cfg, key):
            raise ConfigError(
                f"checkpoint {path} was made with {key}={saved.get(key)!r}, not "
                f"{getattr(cfg, key)!r}; rerun with the same settings or without --resume."
            )
