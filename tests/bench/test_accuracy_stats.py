"""Accuracy statistics: cross-fitted probe predictions, paired bootstrap drop interval, agreement."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from factorlm.bench.accuracy import (
    agreement_rate,
    cross_fitted_predictions,
    paired_bootstrap_drop,
)
from factorlm.errors import DataError


def _correctness(
    n: int, ref_acc: float, cand_acc: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.random(n) < ref_acc
    cand = ref.copy()
    flip = rng.random(n) < abs(ref_acc - cand_acc) * 1.5  # some rows change, mostly for the worse
    cand[flip] = rng.random(int(flip.sum())) < cand_acc
    return ref, cand


def test_interval_contains_the_estimate_and_shrinks_with_n() -> None:
    widths = []
    for n in (200, 2000, 20000):
        ref, cand = _correctness(n, 0.80, 0.76, seed=n)
        point = (ref.mean() - cand.mean()) * 100
        low, high = paired_bootstrap_drop(ref, cand, resamples=2000, seed=0)
        assert low <= point <= high
        assert low < high
        widths.append(high - low)
    # the width of a mean's interval falls like 1/sqrt(n): 10x the rows, ~3.2x narrower
    assert widths[0] / widths[1] == pytest.approx(np.sqrt(10), rel=0.3)
    assert widths[1] / widths[2] == pytest.approx(np.sqrt(10), rel=0.3)


def test_interval_is_paired_seeded_and_exact_for_identical_predictions() -> None:
    ref, cand = _correctness(500, 0.8, 0.75, seed=1)
    assert paired_bootstrap_drop(ref, ref) == (0.0, 0.0)
    assert paired_bootstrap_drop(ref, cand, seed=3) == paired_bootstrap_drop(ref, cand, seed=3)
    # Paired: a candidate that is wrong on exactly one row the reference gets right has a drop
    # of 100/n points and an interval inside [0, a few rows], never below zero.
    one = ref.copy()
    one[np.flatnonzero(ref)[0]] = False
    low, high = paired_bootstrap_drop(ref, one)
    assert low >= 0.0 and high <= 4 * 100 / ref.size
    # An unpaired interval of the same two accuracies would span several points.
    assert high - low < 1.0
    with pytest.raises(ValueError, match="differ"):
        paired_bootstrap_drop(ref, ref[:-1])


class _RecordingProbe:
    """Majority-of-training-labels probe that records which rows it trained on and scored."""

    log: ClassVar[list[dict[str, Any]]] = []

    def fit(self, x: np.ndarray, y: np.ndarray) -> _RecordingProbe:
        self.train = set(x[:, 0].astype(int).tolist())
        values, counts = np.unique(y, return_counts=True)
        self.answer = values[counts.argmax()]
        self.log.append({"train": self.train, "scored": []})
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.log[-1]["scored"].append(x[:, 0].astype(int).tolist())
        return np.full(x.shape[0], self.answer)


def test_cross_fitting_scores_every_row_once_by_a_probe_that_never_saw_it() -> None:
    n = 103
    labels = np.array(["a"] * 70 + ["b"] * 33)
    features = np.column_stack([np.arange(n), np.zeros(n)])  # column 0 names the row
    other = features.copy()  # a second "model": same row ids
    _RecordingProbe.log = []
    predictions, folds = cross_fitted_predictions(
        features, labels, [features, other], folds=5, seed=7, make_probe=_RecordingProbe
    )
    assert folds == 5 and len(_RecordingProbe.log) == 5
    assert [p.shape for p in predictions] == [(n,), (n,)]
    for model in range(2):
        scored = [row for fit in _RecordingProbe.log for row in fit["scored"][model]]
        assert sorted(scored) == list(range(n))  # each row exactly once per model
    for fit in _RecordingProbe.log:
        held = set(fit["scored"][0])
        assert fit["scored"][0] == fit["scored"][1]  # both models scored by the same probe
        assert not held & fit["train"]  # never trained on a row it scores
        assert held | fit["train"] == set(range(n))  # and trained on all the others
        share_b = np.mean([labels[i] == "b" for i in held])
        assert share_b == pytest.approx(33 / 103, abs=0.06)  # stratified
    # seeded: the same folds again, other folds with another seed
    first = [sorted(f["scored"][0]) for f in _RecordingProbe.log]
    _RecordingProbe.log = []
    cross_fitted_predictions(features, labels, [features], seed=7, make_probe=_RecordingProbe)
    assert [sorted(f["scored"][0]) for f in _RecordingProbe.log] == first
    _RecordingProbe.log = []
    cross_fitted_predictions(features, labels, [features], seed=8, make_probe=_RecordingProbe)
    assert [sorted(f["scored"][0]) for f in _RecordingProbe.log] != first


def test_cross_fitting_real_probe_and_fold_limits() -> None:
    rng = np.random.default_rng(0)
    labels = np.array(["pos", "neg"] * 60)
    x = rng.standard_normal((120, 4)) + (labels == "pos")[:, None] * 3.0
    (pred,), folds = cross_fitted_predictions(x, labels, [x], seed=0)
    assert folds == 5 and (pred == labels).mean() > 0.9
    assert agreement_rate(pred, pred) == 1.0
    assert agreement_rate(pred, np.where(np.arange(120) < 12, "x", pred)) == pytest.approx(0.9)
    few = np.array(["pos"] * 10 + ["neg"] * 3)
    _, folds = cross_fitted_predictions(x[:13], few, [x[:13]], folds=5)
    assert folds == 3  # the smallest class has 3 rows
    with pytest.raises(DataError, match="2 rows of every class"):
        cross_fitted_predictions(x[:11], np.array(["pos"] * 10 + ["neg"]), [x[:11]])
