"""Error-correcting targets and robust Grams for sequential, data-aware factorization.

Sequential calibration (issue 16). A weight ``W`` (in × out, ``y = x W``) of the original model
sees inputs ``X`` (tokens × in); in the partially compressed model the same weight sees ``X̂``.
We want the rank-r ``M`` that reproduces the *original* outputs from the inputs it will really
get::

    min_{rank M ≤ r} ‖X W − X̂ M‖_F

With ``Ĝ = X̂ᵀX̂`` and the cross-Gram ``C = X̂ᵀX`` the unconstrained least-squares solution is
``M* = Ĝ⁻¹ C W``, and since ``X̂ᵀ(X W − X̂ M*) = 0`` the objective splits (Pythagoras)::

    ‖X W − X̂ M‖² = ‖X W − X̂ M*‖² + ‖X̂ (M* − M)‖²

The first term does not depend on ``M``; the second is the whitened problem of ``M*`` under the
Gram ``Ĝ`` (``data_aware.whitened_svd``), so the optimum is the whitened truncation of ``M*``.
With ``Ĝ = L Lᵀ``, ``Lᵀ M* = L⁻¹ C W``; when ``X̂ = X`` this is ``Lᵀ W``, plain whitening.
An output weighting ``diag(b)`` (loss-aware, ``‖(X W − X̂ M) diag(b)‖``) splits the same way,
column by column, so it composes with this target unchanged.

``Ĝ`` is damped (``Ĝ + λ·mean(diag Ĝ)·I``) before solving: ``λ`` is a ridge that keeps ``M*``
from fitting noise in directions the calibration barely excites, and makes a singular ``Ĝ``
solvable. The objective then is ``‖X W − X̂ M‖² + λ·mean(diag Ĝ)·‖M‖²`` restricted to the
least-squares part, which is what ``corrected_weight`` returns.

Shrinkage (``shrink_gram``) pulls a Gram toward its diagonal, ``(1 − α) G + α diag(G)``: a small
calibration set over-fits its off-diagonal correlations, and the held-back Gaussian likelihood
(``held_back_loglik``) picks ``α`` on tokens the Gram did not see.

Blending (``blend_gram``) pulls a Gram toward one of generic text instead, per token:
``n·[(1 − β) G/n + β G_gen/n_gen]``. A narrow calibration set (one genre) fits directions the
model's other inputs also use poorly; the generic Gram restores them. ``best_blend`` picks ``β``
by the same held-back likelihood on the user's own held-back tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.linalg

from factorlm.decompose._validate import DecompositionError, check_weight
from factorlm.decompose.data_aware import check_gram

__all__ = [
    "best_blend",
    "best_shrinkage",
    "blend_gram",
    "corrected_weight",
    "held_back_loglik",
    "residual_error",
    "shrink_gram",
]

logger = logging.getLogger(__name__)

_FIRST_DAMPING = 1e-10


def _check_cross(cross: np.ndarray, in_features: int) -> np.ndarray:
    if not isinstance(cross, np.ndarray) or cross.shape != (in_features, in_features):
        shape = getattr(cross, "shape", None)
        raise DecompositionError(
            f"cross has shape {shape} but the weight needs ({in_features}, {in_features}) "
            "(X̂ᵀX over its input features)."
        )
    c = cross.astype(np.float64)
    if not np.isfinite(c).all():
        raise DecompositionError("cross contains NaN or Inf values.")
    return c


def _damped_factor(gram: np.ndarray, ridge: float) -> tuple[np.ndarray, float] | None:
    """Cholesky factor of ``gram + δI`` with ``δ ≥ ridge·mean(diag)``, or None when G = 0.

    The damping grows tenfold from ``max(ridge, 1e-10)`` until the factorization succeeds, so a
    singular or badly conditioned Gram (1e12 and beyond) never fails or produces NaN.
    """
    scale = float(np.mean(np.diag(gram)))
    if scale == 0.0:
        return None
    eps = max(float(ridge), _FIRST_DAMPING)
    identity = np.eye(gram.shape[0])
    while eps <= 1.0:
        try:
            return scipy.linalg.cho_factor(gram + eps * scale * identity, lower=True), eps * scale
        except np.linalg.LinAlgError:
            eps *= 10.0
    raise DecompositionError(
        "gram is not positive semidefinite: its Cholesky fails even with damping of its mean "
        "diagonal."
    )


def corrected_weight(
    W: np.ndarray, gram_hat: np.ndarray, cross: np.ndarray, *, ridge: float = 0.0
) -> np.ndarray:
    """``M* = (Ĝ + δI)⁻¹ C W``: the full-rank weight that maps ``X̂`` closest to ``X W``.

    ``gram_hat = X̂ᵀX̂`` and ``cross = X̂ᵀX`` (both ``(in, in)``). Truncating ``M*`` with the
    whitened SVD under ``gram_hat`` gives the rank-r minimiser of ``‖X W − X̂ M‖_F`` (module
    docstring). ``ridge`` is ``δ`` relative to the mean diagonal of ``Ĝ``. Returned in float64.
    """
    weight = check_weight(W).astype(np.float64)
    g = check_gram(gram_hat, weight.shape[0])
    c = _check_cross(cross, weight.shape[0])
    if ridge < 0 or not np.isfinite(ridge):
        raise DecompositionError(f"ridge must be a finite number >= 0, got {ridge}.")
    factor = _damped_factor(g, ridge)
    if factor is None:  # the compressed model feeds zeros: nothing to correct from
        return weight
    solved: np.ndarray = scipy.linalg.cho_solve(factor[0], c @ weight, check_finite=False)
    return solved


def residual_error(
    W: np.ndarray, M: np.ndarray, gram: np.ndarray, gram_hat: np.ndarray, cross: np.ndarray
) -> float:
    """``‖X W − X̂ M‖_F²`` from the three Grams (``G = XᵀX``, ``Ĝ``, ``C = X̂ᵀX``), no tokens."""
    w = check_weight(W).astype(np.float64)
    m = np.asarray(M, dtype=np.float64)
    g, gh = check_gram(gram, w.shape[0]), check_gram(gram_hat, w.shape[0])
    c = _check_cross(cross, w.shape[0])
    value = np.sum(w * (g @ w)) - 2.0 * np.sum(m * (c @ w)) + np.sum(m * (gh @ m))
    return float(max(value, 0.0))


def shrink_gram(gram: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 − α) G + α diag(G)``: the Gram with its off-diagonal correlations shrunk by ``α``."""
    if not 0.0 <= alpha <= 1.0:
        raise DecompositionError(f"shrinkage must be in [0, 1], got {alpha}.")
    g = np.asarray(gram, dtype=np.float64)
    out = (1.0 - alpha) * g
    out[np.diag_indices_from(out)] = np.diag(g)
    return out


def held_back_loglik(train_gram: np.ndarray, train_tokens: int, test_gram: np.ndarray,
                     test_tokens: int, alpha: float) -> float:  # fmt: skip
    """Mean Gaussian log-likelihood per held-back token under the shrunk training covariance.

    ``Σ = shrink(G_train / n_train, α)``; the held-back tokens enter only through their Gram:
    ``−½ (log det Σ + tr(Σ⁻¹ G_test) / n_test + d log 2π)``. Higher is better.
    """
    if train_tokens < 1 or test_tokens < 1:
        raise DecompositionError("both halves need at least one token.")
    sigma = shrink_gram(np.asarray(train_gram, dtype=np.float64) / train_tokens, alpha)
    return _gaussian_loglik(sigma, np.asarray(test_gram, dtype=np.float64) / test_tokens)


def _gaussian_loglik(sigma: np.ndarray, test_cov: np.ndarray) -> float:
    """``−½ (log det Σ + tr(Σ⁻¹ S) + d log 2π)``: mean log-likelihood of tokens with second
    moment ``S`` under ``N(0, Σ)`` (−inf when ``Σ`` is zero)."""
    d = sigma.shape[0]
    factor = _damped_factor(sigma, 0.0)
    if factor is None:
        return float("-inf")
    chol = factor[0][0]
    logdet = 2.0 * float(np.sum(np.log(np.abs(np.diag(chol)))))
    inv_test = scipy.linalg.cho_solve(factor[0], test_cov)
    return -0.5 * (logdet + float(np.trace(inv_test)) + d * np.log(2.0 * np.pi))


def blend_gram(
    gram: np.ndarray, tokens: int, generic: np.ndarray, generic_tokens: int, beta: float
) -> np.ndarray:
    """``n·[(1 − β) G/n + β G_gen/n_gen]``: ``gram`` (of ``tokens`` tokens) pulled toward the
    generic-text Gram ``generic`` per token, kept in ``gram``'s token units (``n = tokens``) so
    loss-unit errors stay comparable with unblended weights. Any per-token sum of one shape
    blends the same way: the output Fisher ``Σ_t g_t²`` (out,) too."""
    if not 0.0 <= beta <= 1.0:
        raise DecompositionError(f"blend must be in [0, 1], got {beta}.")
    if tokens < 1 or generic_tokens < 1:
        raise DecompositionError("both Grams need at least one token.")
    g = np.asarray(gram, dtype=np.float64)
    h = np.asarray(generic, dtype=np.float64)
    if h.shape != g.shape:
        raise DecompositionError(
            f"the generic Gram has shape {h.shape} but the calibration Gram {g.shape}."
        )
    if beta == 0.0:
        return g.copy()
    out: np.ndarray = (1.0 - beta) * g + (beta * tokens / generic_tokens) * h
    return out


def best_blend(
    train_gram: np.ndarray,
    train_tokens: int,
    test_gram: np.ndarray,
    test_tokens: int,
    generic: np.ndarray,
    generic_tokens: int,
    grid: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9),
) -> float:
    """The ``β`` of ``grid`` under whose blend of the training Gram with ``generic`` the
    held-back tokens are most likely (Gaussian, per token; ties: the smallest ``β``)."""
    if train_tokens < 1 or test_tokens < 1:
        raise DecompositionError("both halves need at least one token.")
    test_cov = np.asarray(test_gram, dtype=np.float64) / test_tokens
    scores = [
        _gaussian_loglik(
            blend_gram(train_gram, train_tokens, generic, generic_tokens, b) / train_tokens,
            test_cov,
        )
        for b in grid
    ]
    best = int(np.argmax(scores))
    logger.debug("blend scores %s -> %.3g", np.round(scores, 3), grid[best])
    return float(grid[best])


def best_shrinkage(
    train_gram: np.ndarray,
    train_tokens: int,
    test_gram: np.ndarray,
    test_tokens: int,
    grid: Sequence[float] = (0.0, 0.01, 0.03, 0.1, 0.2, 0.4, 0.7, 1.0),
) -> float:
    """The ``α`` of ``grid`` with the highest held-back likelihood (ties: the smallest ``α``)."""
    scores = [held_back_loglik(train_gram, train_tokens, test_gram, test_tokens, a) for a in grid]
    best = int(np.argmax(scores))
    logger.debug("shrinkage scores %s -> %.3g", np.round(scores, 3), grid[best])
    return float(grid[best])
