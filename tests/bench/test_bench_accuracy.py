"""Fidelity metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from factorlm.bench.accuracy import FidelityAccumulator, fidelity, log_softmax, mean_pool


def test_cosine_errors_and_argmax_by_hand() -> None:
    ref = np.array([[3.0, 4.0], [1.0, 0.0]])
    cand = np.array([[3.0, 4.0], [0.0, 1.0]])
    m = fidelity(ref, cand)
    assert m["cosine_mean"] == pytest.approx(0.5, abs=1e-15)  # rows: 1 and 0
    assert m["cosine_min"] == pytest.approx(0.0, abs=1e-15)
    assert m["max_abs_error"] == 1.0
    # |r - c|_F = sqrt(2), |r|_F = sqrt(26)
    assert m["rel_l2_error"] == pytest.approx(math.sqrt(2 / 26), rel=1e-14)
    assert m["argmax_agreement"] == 0.5  # row 0: index 1 vs 1, row 1: 0 vs 1


def test_kl_divergence_by_hand() -> None:
    # p = softmax(0, 0) = (1/2, 1/2), q = softmax(ln 3, 0) = (3/4, 1/4)
    # KL(p||q) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    m = fidelity(np.array([[0.0, 0.0]]), np.array([[math.log(3.0), 0.0]]))
    assert m["kl_divergence"] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-14)
    assert fidelity(np.array([[1.0, 2.0]]), np.array([[1.0, 2.0]]))["kl_divergence"] == 0.0


def test_zero_rows_and_scalars() -> None:
    m = fidelity(np.zeros((2, 3)), np.zeros((2, 3)))
    assert m["cosine_mean"] == 1.0 and m["rel_l2_error"] == 0.0
    assert fidelity(np.zeros((1, 3)), np.ones((1, 3)))["cosine_mean"] == 0.0
    assert fidelity(np.array([[2.0]]), np.array([[2.0]]))["argmax_agreement"] is None


def test_pooled_cosine_uses_the_mask() -> None:
    ref = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    cand = np.array([[[1.0, 0.0], [5.0, 5.0]]])  # differs only at the padded position
    mask = np.array([[1, 0]])
    np.testing.assert_allclose(mean_pool(ref, mask), [[1.0, 0.0]])
    m = fidelity(ref, cand, mask)
    assert m["pooled_cosine_mean"] == pytest.approx(1.0, abs=1e-15)
    assert m["cosine_mean"] < 1.0


def test_accumulated_batches_equal_the_concatenation() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    acc = FidelityAccumulator()
    acc.add({"y": a[:2]}, {"y": b[:2]})
    acc.add({"y": a[2:]}, {"y": b[2:]})
    whole = fidelity(a, b)
    for key, value in acc.result()["y"].items():
        assert value == pytest.approx(whole[key], rel=1e-12), key


def test_log_softmax_is_stable() -> None:
    out = log_softmax(np.array([1000.0, 1000.0]))
    np.testing.assert_allclose(out, [-math.log(2)] * 2, rtol=1e-15)
