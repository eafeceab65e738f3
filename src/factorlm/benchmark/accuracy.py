"""Output fidelity of a candidate against the reference on identical inputs.

Each output is viewed as rows along its last axis (a token's hidden state, a row of logits), then:

- cosine similarity per row, ``<r, c> / (|r| |c|)`` (mean and minimum over rows; two zero rows
  count as identical, one zero row as orthogonal);
- max absolute error ``max |r - c|``;
- relative L2 error ``|r - c|_F / |r|_F`` over the whole output;
- argmax agreement, the fraction of rows whose largest entry sits at the same index;
- KL divergence ``KL(softmax(r) || softmax(c))`` per row in nats, averaged (meaningful for logits);
- for rank-3 outputs with an attention mask, the cosine of the mean-pooled sequence embeddings,
  the quantity a sentence-embedding user sees.

Batches accumulate exactly (sums, not averages of averages), so fidelity over many batches of
different shapes equals fidelity over their concatenation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FidelityAccumulator", "OutputFidelity", "fidelity", "log_softmax", "mean_pool"]

logger = logging.getLogger(__name__)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax in float64."""
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def mean_pool(hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mean of token vectors where ``mask`` is 1: ``(batch, seq, dim) -> (batch, dim)``."""
    hidden = np.asarray(hidden, dtype=np.float64)
    if mask is None:
        return hidden.mean(axis=1)
    weights = np.asarray(mask, dtype=np.float64)[..., None]
    return (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim <= 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


def _row_cosine(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    nr = np.linalg.norm(r, axis=1)
    nc = np.linalg.norm(c, axis=1)
    dot = (r * c).sum(axis=1)
    both_zero = (nr == 0) & (nc == 0)
    denom = np.where((nr == 0) | (nc == 0), 1.0, nr * nc)
    cos = np.where((nr == 0) | (nc == 0), 0.0, dot / denom)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


@dataclass
class OutputFidelity:
    """Running sums for one output; ``result()`` turns them into the metrics above."""

    rows: int = 0
    cosine_sum: float = 0.0
    cosine_min: float = 1.0
    max_abs_error: float = 0.0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    argmax_equal: int = 0
    kl_sum: float = 0.0
    width: int = 0
    pooled_rows: int = 0
    pooled_cosine_sum: float = 0.0
    pooled_cosine_min: float = 1.0

    def add(self, ref: np.ndarray, cand: np.ndarray, mask: np.ndarray | None = None) -> None:
        if np.shape(ref) != np.shape(cand):
            raise ValueError(f"output shapes differ: {np.shape(ref)} vs {np.shape(cand)}")
        r, c = _rows(ref), _rows(cand)
        if r.size == 0:
            return
        cos = _row_cosine(r, c)
        self.rows += r.shape[0]
        self.width = r.shape[1]
        self.cosine_sum += float(cos.sum())
        self.cosine_min = min(self.cosine_min, float(cos.min()))
        diff = r - c
        self.max_abs_error = max(self.max_abs_error, float(np.abs(diff).max()))
        self.diff_sq += float((diff * diff).sum())
        self.ref_sq += float((r * r).sum())
        if r.shape[1] > 1:
            self.argmax_equal += int((r.argmax(axis=1) == c.argmax(axis=1)).sum())
            lp, lq = log_softmax(r), log_softmax(c)
            self.kl_sum += float((np.exp(lp) * (lp - lq)).sum())
        if np.ndim(ref) == 3 and mask is not None and np.shape(mask) == np.shape(ref)[:2]:
            pooled = _row_cosine(mean_pool(ref, mask), mean_pool(cand, mask))
            self.pooled_rows += pooled.size
            self.pooled_cosine_sum += float(pooled.sum())
            self.pooled_cosine_min = min(self.pooled_cosine_min, float(pooled.min()))

    def result(self) -> dict[str, Any]:
        if self.rows == 0:
            return {"rows": 0}
        if self.ref_sq > 0:
            rel = float(np.sqrt(self.diff_sq / self.ref_sq))
        else:
            rel = 0.0 if self.diff_sq == 0 else float("inf")
        out: dict[str, Any] = {
            "rows": self.rows,
            "cosine_mean": self.cosine_sum / self.rows,
            "cosine_min": self.cosine_min,
            "max_abs_error": self.max_abs_error,
            "rel_l2_error": rel,
            "argmax_agreement": self.argmax_equal / self.rows if self.width > 1 else None,
            "kl_divergence": self.kl_sum / self.rows if self.width > 1 else None,
        }
        if self.pooled_rows:
            out["pooled_cosine_mean"] = self.pooled_cosine_sum / self.pooled_rows
            out["pooled_cosine_min"] = self.pooled_cosine_min
        return out


@dataclass
class FidelityAccumulator:
    """Fidelity of one candidate over every output and every batch it is shown."""

    outputs: dict[str, OutputFidelity] = field(default_factory=dict)

    def add(
        self,
        ref: dict[str, np.ndarray],
        cand: dict[str, np.ndarray],
        mask: np.ndarray | None = None,
    ) -> None:
        for name, value in ref.items():
            if name not in cand or not np.issubdtype(np.asarray(value).dtype, np.number):
                continue
            self.outputs.setdefault(name, OutputFidelity()).add(value, cand[name], mask)

    def result(self) -> dict[str, dict[str, Any]]:
        return {name: acc.result() for name, acc in self.outputs.items()}


def fidelity(ref: np.ndarray, cand: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Any]:
    """All fidelity metrics of one output pair (see the module docstring)."""
    acc = OutputFidelity()
    acc.add(ref, cand, mask)
    return acc.result()
