"""The calibration statistics container and its ``.npz`` format.

Why a format of our own inside ``.npz``: ONNX initializer names contain ``/``, ``:`` and dots,
which make poor zip member names, so arrays are stored under positional keys with a JSON index
of ``(kind, initializer name)`` pairs. No pickle is involved, so loading a file is safe.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from factorlm.errors import DataError

__all__ = ["CalibrationStats", "load_arrays", "save_arrays"]

logger = logging.getLogger(__name__)

_KINDS = (
    "gram", "mean_abs", "fisher", "output_fisher", "gram_heldout", "output_gram", "token_counts"
)  # fmt: skip
_FORMAT = "factorlm-calibration-1"


def save_arrays(
    path: Path, groups: dict[str, dict[str, np.ndarray]], meta: dict[str, object]
) -> None:
    """Write named array groups plus JSON metadata to ``path`` atomically (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    index: list[list[str]] = []
    arrays: dict[str, np.ndarray] = {}
    for kind, named in groups.items():
        for name, array in named.items():
            arrays[f"a{len(index)}"] = np.asarray(array)
            index.append([kind, name])
    header = json.dumps({"format": _FORMAT, "index": index, "meta": meta})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        arrays["__header__"] = np.array(header)
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_arrays(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, object]]:
    """Read what :func:`save_arrays` wrote: ``(groups, meta)``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The statistics file {path} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(str(npz["__header__"]))
            if header.get("format") != _FORMAT:
                raise DataError(f"{path} is not a factorlm statistics file.")
            groups: dict[str, dict[str, np.ndarray]] = {}
            for i, (kind, name) in enumerate(header["index"]):
                groups.setdefault(kind, {})[name] = npz[f"a{i}"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path} is not a readable factorlm statistics file ({exc}).") from exc
    return groups, dict(header.get("meta", {}))


def _count(value: object) -> int:
    return int(value) if isinstance(value, int | float | str) else 0


@dataclass
class CalibrationStats:
    """Statistics of each target weight's input activation, keyed by ONNX initializer name.

    Attributes:
        gram: ``X^T X`` (in, in) float64, summed over every non-padding token.
        mean_abs: mean ``|x|`` per input feature (in,) float64.
        fisher: Fisher row sums per output feature (out,) float64 (FWSVD), when collected.
        output_fisher: ``Σ (∂L/∂y_j)²`` per output feature (out,) float64 (loss-aware whitening).
        output_gram: the full ``Σ_t g_t g_tᵀ`` (out, out) float64 of the output gradients ``g_t``
            (loss-aware whitening; used instead of ``output_fisher`` where present).
        gram_heldout: the part of ``gram`` from held-back batches (``heldout_tokens`` tokens),
            for choosing the shrinkage by held-back likelihood; empty unless asked for.
        tokens: number of non-padding tokens that went into the statistics.
        token_counts: for an embedding tied to an LM head (a target also read by
            ``Gather(E, input_ids)``), how often each token id was looked up (vocab,) float64:
            the rows a factorization of the shared matrix must keep (``planning.lookup_weight``).
    """

    gram: dict[str, np.ndarray] = field(default_factory=dict)
    mean_abs: dict[str, np.ndarray] = field(default_factory=dict)
    fisher: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: int = 0
    output_fisher: dict[str, np.ndarray] = field(default_factory=dict)
    gram_heldout: dict[str, np.ndarray] = field(default_factory=dict)
    heldout_tokens: int = 0
    output_gram: dict[str, np.ndarray] = field(default_factory=dict)
    token_counts: dict[str, np.ndarray] = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        """Write the statistics to ``path`` (.npz), atomically; return the path."""
        groups = {kind: getattr(self, kind) for kind in _KINDS}
        meta: dict[str, object] = {
            "tokens": int(self.tokens),
            "heldout_tokens": int(self.heldout_tokens),
        }
        save_arrays(Path(path), groups, meta)
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> CalibrationStats:
        """Read statistics written by :meth:`save`."""
        groups, meta = load_arrays(Path(path))
        tokens = meta.get("tokens", 0)
        return cls(
            gram=groups.get("gram", {}),
            mean_abs=groups.get("mean_abs", {}),
            fisher=groups.get("fisher", {}),
            output_fisher=groups.get("output_fisher", {}),
            gram_heldout=groups.get("gram_heldout", {}),
            output_gram=groups.get("output_gram", {}),
            token_counts=groups.get("token_counts", {}),
            heldout_tokens=_count(meta.get("heldout_tokens", 0)),
            tokens=int(tokens) if isinstance(tokens, int | float | str) else 0,
        )
