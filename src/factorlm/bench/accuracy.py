"""Output fidelity of a candidate against the reference, and accuracy statistics you can trust.

Accuracy (classification): ``cross_fitted_predictions`` trains the probe on the reference's
features of k-1 stratified, seeded folds and predicts the held-out fold for every model, so every
row is scored exactly once by a probe that never saw it, and all rows count (not a 20 % split).
``paired_bootstrap_drop`` resamples rows with replacement, the same rows for reference and
candidate, and gives a percentile interval of the accuracy drop in points: the rows' difficulty
cancels, so the interval measures the compression, not the data set. Identical predictions give
exactly [0, 0].

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from factorlm.errors import DataError

__all__ = [
    "DEFAULT_FOLDS",
    "DEFAULT_RESAMPLES",
    "FidelityAccumulator",
    "OutputFidelity",
    "agreement_rate",
    "cross_fitted_predictions",
    "fidelity",
    "log_softmax",
    "mean_pool",
    "paired_bootstrap_drop",
]

DEFAULT_FOLDS = 5
DEFAULT_RESAMPLES = 2000

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


def _logistic_probe() -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000)


def cross_fitted_predictions(
    train_features: np.ndarray,
    labels: np.ndarray,
    eval_features: Sequence[np.ndarray],
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    make_probe: Callable[[], Any] | None = None,
) -> tuple[list[np.ndarray], int]:
    """Out-of-fold probe predictions of every row, for each array in ``eval_features``.

    The probe of fold f is fitted on ``train_features`` (the reference's) of the other folds and
    predicts fold f's rows of every ``eval_features`` array. Folds are stratified and shuffled
    with ``seed``; ``folds`` shrinks to the smallest class's size (at least 2). Returns the
    predictions and the number of folds used. ``make_probe`` builds an object with
    ``fit(X, y)`` / ``predict(X)`` (default: scikit-learn logistic regression).
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    _, counts = np.unique(labels, return_counts=True)
    used = min(int(folds), int(counts.min()))
    if folds < 2 or used < 2:
        raise DataError(
            f"Cross-fitting needs at least 2 folds and 2 rows of every class (folds {folds}, "
            f"smallest class {int(counts.min())} rows)."
        )
    if used < folds:
        logger.info("Using %s folds: the smallest class has %s rows", used, used)
    build = make_probe or _logistic_probe
    predictions = [np.empty(labels.shape, dtype=labels.dtype) for _ in eval_features]
    splitter = StratifiedKFold(n_splits=used, shuffle=True, random_state=seed)
    for train, test in splitter.split(np.zeros(labels.size), labels):
        probe = build()
        probe.fit(train_features[train], labels[train])
        for out, features in zip(predictions, eval_features, strict=True):
            out[test] = probe.predict(features[test])
    return predictions, used


def agreement_rate(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of rows where the candidate predicts what the reference predicts."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape or reference.size == 0:
        raise ValueError(f"prediction shapes {reference.shape} and {candidate.shape} differ")
    return float((reference == candidate).mean())


def paired_bootstrap_drop(
    reference_correct: np.ndarray,
    candidate_correct: np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the accuracy drop (reference - candidate) in points.

    Each resample draws n row indices with replacement and scores both models on the same rows.
    """
    ref = np.asarray(reference_correct, dtype=np.float64).reshape(-1)
    cand = np.asarray(candidate_correct, dtype=np.float64).reshape(-1)
    if ref.shape != cand.shape or ref.size == 0:
        raise ValueError(f"correctness shapes {ref.shape} and {cand.shape} differ or are empty")
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(
            f"resamples {resamples} must be >= 1 and confidence {confidence} in (0, 1)"
        )
    diff = (ref - cand) * 100.0
    if not diff.any():
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    n = diff.size
    drops = np.empty(resamples)
    step = max(1, 4_000_000 // n)  # bound the index matrix to ~32 MB
    for start in range(0, resamples, step):
        rows = min(step, resamples - start)
        drops[start : start + rows] = diff[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(drops, [tail, 100.0 - tail])
    return float(low), float(high)
