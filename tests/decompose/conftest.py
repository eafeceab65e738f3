"""Shared builders for the decomposition tests: matrices with a known spectrum, a brute-force
low-rank optimiser that knows nothing about SVD."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import scipy.optimize
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def _single_blas_thread() -> Iterator[None]:
    """Tiny matrices only: threaded BLAS on a shared 2-core machine is 25x slower, not faster."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def decaying(m: int, n: int, seed: int, decay: float = 0.6) -> np.ndarray:
    """A random ``(m, n)`` matrix with singular values ``(i + 1) ** -decay``."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (u * (np.arange(k) + 1.0) ** -decay) @ v.T


def brute_force_lowrank(
    objective: Callable[[np.ndarray], tuple[float, np.ndarray]],
    shape: tuple[int, int],
    rank: int,
    *,
    starts: int = 6,
    seed: int = 0,
) -> float:
    """Smallest ``objective(L @ R)`` found by L-BFGS over ``(L, R)`` from random starts.

    ``objective(M)`` returns the value and its gradient with respect to ``M``; the chain rule
    gives the gradients for the factors. No SVD is involved, so this is an independent check of
    a closed form's claimed optimum.
    """
    m, n = shape
    rng = np.random.default_rng(seed)

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        left = theta[: m * rank].reshape(m, rank)
        right = theta[m * rank :].reshape(rank, n)
        value, grad = objective(left @ right)
        return value, np.concatenate([(grad @ right.T).ravel(), (left.T @ grad).ravel()])

    best = np.inf
    for _ in range(starts):
        theta0 = rng.standard_normal(rank * (m + n))
        res = scipy.optimize.minimize(
            f,
            theta0,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 3000, "gtol": 1e-10, "ftol": 1e-14},
        )
        best = min(best, float(res.fun))
    return best
