"""Input checks shared by every decomposition, so each bad input fails the same way.

The core is called by the planner and the passes with arrays taken from real models; a NaN or an
integer initializer must stop the run with one sentence naming the problem instead of producing
silent garbage. ``DecompositionError`` is both a ``ValueError`` (the core's contract) and a
``FactorlmError`` (so the CLI prints it as one line and exits 2).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from factorlm.errors import FactorlmError

__all__ = [
    "DecompositionError",
    "cast_back",
    "check_alpha",
    "check_rank",
    "check_vector",
    "check_weight",
]

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class DecompositionError(FactorlmError, ValueError):
    """A weight, rank or statistic given to the decomposition core is invalid."""


def check_weight(weight: Any, name: str = "W") -> np.ndarray:
    """Return ``weight`` as a validated 2-D float array (not copied)."""
    if not isinstance(weight, np.ndarray):
        raise DecompositionError(f"{name} must be a numpy array, got {type(weight).__name__}.")
    if weight.ndim != 2:
        raise DecompositionError(f"{name} must be 2-D (in, out), got shape {weight.shape}.")
    if weight.dtype not in _FLOAT_DTYPES:
        raise DecompositionError(
            f"{name} has dtype {weight.dtype}; only float16, float32 and float64 weights can be "
            "decomposed."
        )
    if weight.size == 0:
        raise DecompositionError(f"{name} is empty (shape {weight.shape}).")
    if not np.isfinite(weight).all():
        raise DecompositionError(f"{name} contains NaN or Inf values.")
    return weight


def check_rank(rank: Any, shape: tuple[int, int], name: str = "W") -> int:
    """Return ``rank`` as an int in ``[1, min(shape)]``."""
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise DecompositionError(f"rank must be an integer, got {rank!r}.")
    limit = min(shape)
    if not 1 <= int(rank) <= limit:
        raise DecompositionError(
            f"rank {rank} is out of range for {name} of shape {shape}: it must be in [1, {limit}]."
        )
    return int(rank)


def check_vector(values: Any, length: int, name: str, *, what: str) -> np.ndarray:
    """Return a finite, non-negative float64 vector of ``length`` (a per-feature statistic)."""
    if not isinstance(values, np.ndarray):
        raise DecompositionError(f"{name} must be a numpy array, got {type(values).__name__}.")
    if values.shape != (length,):
        raise DecompositionError(
            f"{name} has shape {values.shape} but the weight needs ({length},) ({what})."
        )
    if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise DecompositionError(f"{name} must be real numbers, got dtype {values.dtype}.")
    out = values.astype(np.float64)
    if not np.isfinite(out).all():
        raise DecompositionError(f"{name} contains NaN or Inf values.")
    if (out < 0).any():
        raise DecompositionError(f"{name} has negative entries; it must be non-negative.")
    return out


def check_alpha(alpha: float) -> float:
    """Return ASVD's exponent ``alpha`` as a float, refusing NaN, Inf and negative values."""
    if not np.isfinite(alpha) or alpha < 0:
        raise DecompositionError(f"alpha must be a finite non-negative number, got {alpha!r}.")
    return float(alpha)


def cast_back(array: np.ndarray, dtype: np.dtype[Any], name: str) -> np.ndarray:
    """Cast a float64 result to the weight's dtype, refusing values that overflow it."""
    out = np.ascontiguousarray(array.astype(dtype, copy=False))
    if not np.isfinite(out).all():
        raise DecompositionError(
            f"the {name} factor overflows {np.dtype(dtype).name}; decompose in a wider dtype."
        )
    return out
