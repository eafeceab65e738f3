"""Sums of Kronecker products (Van Loan and Pitsianis's nearest Kronecker product).

``W ≈ Σ_i A_i ⊗ B_i`` with ``W: (a_in·b_in, a_out·b_out)``, ``A_i: (a_in, a_out)`` and
``B_i: (b_in, b_out)``. Entry ``W[i1·b_in + i2, j1·b_out + j2] = Σ_t A_t[i1, j1] B_t[i2, j2]``, so
the rearrangement ``R(W)[(i1, j1), (i2, j2)] = W[i1·b_in + i2, j1·b_out + j2]`` turns the sum
into a rank-``terms`` matrix ``Σ_t vec(A_t) vec(B_t)ᵀ``. ``R`` only permutes entries, hence
``‖W − Σ A_t ⊗ B_t‖_F = ‖R(W) − Σ vec(A_t) vec(B_t)ᵀ‖_F`` and the truncated SVD of ``R(W)`` is
the optimum (Eckart–Young); singular values are split as square roots between ``A`` and ``B``.

``y = x @ (A ⊗ B)`` needs no dense matrix: with ``X`` the token reshaped to ``(a_in, b_in)``,
``y = vec(Aᵀ X B)``, costing ``a_in·b_in·b_out + a_in·a_out·b_out`` multiply-adds (or the other
association order, whichever is cheaper). The graph rewrite (``passes.kronecker``) computes
``(Aᵀ X) B``: ``terms · a_out·b_in·(a_in + b_out)`` multiply-adds, which is
``terms · (1/a_in + 1/b_out)`` of the dense ``m·n``, while the parameters are
``terms · (1/(a_in·a_out) + 1/(b_in·b_out))`` of dense. FLOPs are therefore never below
parameters (equal only for the low-rank split ``a_out = b_in = 1``); with every factor
dimension at least 2 the fewest FLOPs per parameter, twice the parameters, come from
``a = (in/2, 2)``, ``b = (2, out/2)`` (``kronecker_cost``, ``propose_kronecker_shapes(by="flops")``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg

from factorlm.decompose._validate import DecompositionError, cast_back, check_weight
from factorlm.decompose.svd import factors_from_svd, svd_rank

__all__ = [
    "KroneckerFactors",
    "kronecker",
    "kronecker_cost",
    "kronecker_spectrum",
    "propose_kronecker_shapes",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class KroneckerFactors:
    """``W ≈ Σ_i kron(a[i], b[i])`` with ``a: (terms, a_in, a_out)``, ``b: (terms, b_in, b_out)``."""

    a: np.ndarray
    b: np.ndarray

    def __post_init__(self) -> None:
        if self.a.ndim != 3 or self.b.ndim != 3 or self.a.shape[0] != self.b.shape[0]:
            raise DecompositionError(
                f"Kronecker factors must be (terms, in, out) stacks with equal terms, got "
                f"{self.a.shape} and {self.b.shape}."
            )

    @property
    def terms(self) -> int:
        """Number of Kronecker products summed."""
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(a_in·b_in, a_out·b_out)`` of the approximated weight."""
        _, a_in, a_out = self.a.shape
        _, b_in, b_out = self.b.shape
        return int(a_in * b_in), int(a_out * b_out)

    @property
    def num_params(self) -> int:
        """Stored parameters ``terms · (a_in·a_out + b_in·b_out)``."""
        return int(self.terms * (self.a[0].size + self.b[0].size))

    @property
    def flops_per_token(self) -> int:
        """``2 · terms ·`` multiply-adds of ``Aᵀ X B`` in the cheaper association order."""
        _, a_in, a_out = self.a.shape
        _, b_in, b_out = self.b.shape
        right_first = a_in * b_in * b_out + a_in * a_out * b_out
        left_first = a_out * a_in * b_in + a_out * b_in * b_out
        return int(2 * self.terms * min(right_first, left_first))

    def reconstruct(self) -> np.ndarray:
        """Dense ``Σ kron(a[i], b[i])`` (computed in float64, returned in the factors' dtype)."""
        a = self.a.astype(np.float64)
        b = self.b.astype(np.float64)
        _, a_in, a_out = a.shape
        _, b_in, b_out = b.shape
        dense = np.einsum("tij,tkl->ikjl", a, b).reshape(a_in * b_in, a_out * b_out)
        return dense.astype(self.a.dtype)


def _rearrange(
    weight: np.ndarray, a_shape: tuple[int, int], b_shape: tuple[int, int]
) -> np.ndarray:
    """Van Loan's ``R(W)``: rows index ``(i1, j1)`` of ``A``, columns ``(i2, j2)`` of ``B``."""
    (a_in, a_out), (b_in, b_out) = a_shape, b_shape
    blocks = weight.reshape(a_in, b_in, a_out, b_out).transpose(0, 2, 1, 3)
    return blocks.reshape(a_in * a_out, b_in * b_out)


def _b_shape(shape: tuple[int, int], a_shape: tuple[int, int]) -> tuple[int, int]:
    if (
        len(a_shape) != 2
        or any(isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1 for d in a_shape)
        or shape[0] % a_shape[0]
        or shape[1] % a_shape[1]
    ):
        raise DecompositionError(
            f"a_shape {tuple(a_shape)} does not divide the weight shape {shape}: it must be two "
            "positive integers dividing (in, out)."
        )
    return shape[0] // int(a_shape[0]), shape[1] // int(a_shape[1])


def kronecker(W: np.ndarray, a_shape: tuple[int, int], terms: int) -> KroneckerFactors:
    """Best ``Σ_{i<terms} A_i ⊗ B_i`` approximation of ``W`` in Frobenius norm (Van Loan)."""
    weight = check_weight(W)
    b_shape = _b_shape(weight.shape, tuple(a_shape))  # type: ignore[arg-type]
    a_in, a_out = int(a_shape[0]), int(a_shape[1])
    a = (a_in, a_out)
    b_in, b_out = b_shape
    limit = min(a_in * a_out, b_in * b_out)
    if (
        isinstance(terms, bool)
        or not isinstance(terms, int | np.integer)
        or not 1 <= terms <= limit
    ):
        raise DecompositionError(
            f"terms {terms!r} is out of range for a_shape {a} and b_shape {b_shape}: it must be "
            f"an integer in [1, {limit}]."
        )
    rearranged = _rearrange(weight.astype(np.float64), (a_in, a_out), b_shape)
    u, s, vt = svd_rank(rearranged, int(terms), method="exact")
    left, right = factors_from_svd(u, s, vt)
    a_stack = left.T.reshape(int(terms), a_in, a_out)
    b_stack = right.reshape(int(terms), b_in, b_out)
    return KroneckerFactors(
        a=cast_back(a_stack, weight.dtype, "A"), b=cast_back(b_stack, weight.dtype, "B")
    )


def kronecker_spectrum(W: np.ndarray, a_shape: tuple[int, int]) -> np.ndarray:
    """Descending singular values of Van Loan's ``R(W)`` for the split ``a_shape``.

    ``Σ s[t:]²`` is the squared Frobenius error of the best ``t``-term Kronecker sum, so this is
    the planner's spectrum for one factor shape. Like ``methods.prepare`` it takes the
    eigenvalues of the Gram on the smaller side (no SVD, no vectors): the tail energies it is
    read for are exact to the rounding of ``‖W‖²``.
    """
    weight = check_weight(W)
    b_shape = _b_shape(weight.shape, tuple(a_shape))  # type: ignore[arg-type]
    a = (int(a_shape[0]), int(a_shape[1]))
    rearranged = _rearrange(weight.astype(np.float64), a, b_shape)
    if rearranged.shape[0] > rearranged.shape[1]:
        rearranged = rearranged.T
    values = scipy.linalg.eigvalsh(rearranged @ rearranged.T, check_finite=False)
    return np.sqrt(np.maximum(values[::-1], 0.0))


def kronecker_cost(
    a_shape: tuple[int, int], b_shape: tuple[int, int], terms: int
) -> tuple[int, int]:
    """Parameters and FLOPs per token (``2·`` multiply-adds) of the ``(Aᵀ X) B`` rewrite."""
    (a_in, a_out), (b_in, b_out) = a_shape, b_shape
    params = terms * (a_in * a_out + b_in * b_out)
    # Âᵀ X costs t·a_out·a_in·b_in, then (a_out, t·b_in) @ B̂ costs a_out·t·b_in·b_out.
    flops = 2 * terms * a_out * b_in * (a_in + b_out)
    return int(params), int(flops)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def propose_kronecker_shapes(
    in_features: int,
    out_features: int,
    *,
    limit: int = 8,
    by: Literal["params", "flops"] = "params",
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Candidate ``(a_shape, b_shape)`` splits of ``(in, out)``, fewest parameters per term first.

    With ``by="flops"``, fewest FLOPs per token per stored parameter first (``kronecker_cost``):
    at any parameter count, the split whose rewrite computes least; ties as below.

    Every factor dimension is at least 2 when the shape allows it (a vector factor makes the
    product a thin structured matrix); otherwise both factors need more than one entry. Ties are broken towards balanced
    factors (``a`` and ``b`` of similar size), then towards square factors, then lexicographically,
    so the order is stable.
    """
    if by not in ("params", "flops"):
        raise DecompositionError(f"by {by!r} is unknown; use 'params' or 'flops'.")
    if in_features < 1 or out_features < 1:
        raise DecompositionError(
            f"in_features and out_features must be positive, got ({in_features}, {out_features})."
        )
    candidates: list[tuple[float, int, int, float, tuple[tuple[int, int], tuple[int, int]]]] = []
    for strict in (True, False):
        for a_in in _divisors(in_features):
            for a_out in _divisors(out_features):
                b_in, b_out = in_features // a_in, out_features // a_out
                a_size, b_size = a_in * a_out, b_in * b_out
                if a_size < 2 or b_size < 2:
                    continue
                if strict and min(a_in, a_out, b_in, b_out) < 2:
                    continue
                skew = abs(math.log(a_in / a_out)) + abs(math.log(b_in / b_out))
                shapes = ((a_in, a_out), (b_in, b_out))
                params, flops = kronecker_cost(shapes[0], shapes[1], 1)
                first = round(flops / params, 9) if by == "flops" else 0.0
                candidates.append(
                    (first, a_size + b_size, abs(a_size - b_size), round(skew, 9), shapes)
                )
        if candidates:
            break
    candidates.sort()
    return [shapes for *_, shapes in candidates[:limit]]
