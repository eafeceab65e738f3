"""One entry point per method name, for the planner: factors and cheap spectra.

``spectrum(W, method)`` returns the singular values of exactly the matrix that ``decompose(W,
method, r)`` truncates, so ``Σ s[r:]²`` is that method's (data-aware) squared error at rank r:
``‖W − M‖²`` for svd, ``‖X (W − M)‖² (+ δ‖W − M‖²)`` for whiten/drone, ``‖diag(s^α)(W − M)‖²``
for asvd and ``Σ_j I_j ‖W[:, j] − M[:, j]‖²`` for fwsvd. Only singular values are computed
(LAPACK without vectors), because the planner asks for every weight of the model.

``prepare(W, method)`` is the planner's one-pass alternative: it forms the Gram matrix of the
transformed matrix ``Z = A W B`` on its smaller side and takes its eigendecomposition (float64),
which gives the whole spectrum *and* the leading singular vectors; ``PreparedWeight.lowrank(W,
r)`` then builds the rank-r factors from those vectors with one matrix product. With ``keep=0``
only the eigenvalues are computed (``eigvalsh``: about a quarter of ``eigh`` and a tenth of
``svdvals`` on 768 × 3072), and ``lowrank`` takes one ``eigh`` of the same Gram for the weights
the allocation actually factorizes. That is what the planner does, so nothing but the spectra is
held between planning and factorizing. Kept vectors are float32 for float32/float16 weights.

On the tall side (``in > out``) the whitening is applied through ``AᵀA = G + δI`` directly:
``K = Bᵀ Wᵀ (G + δI) W B`` needs no Cholesky of the large Gram, and the left factor
``A⁻¹ Z V_r = W B V_r`` needs no triangular solve. ``δ`` is the first step of the adaptive damping
rule (1e-10 of the mean diagonal), so the objective is ``decompose``'s whenever its Cholesky
succeeds at once (always, for a Gram from more tokens than features).

Loss-aware whiten/drone weight the output side too: by a diagonal ``output_weight`` (``B =
diag(√g)``, blocked products as above) or by the full output-gradient Gram ``output_gram`` ``H``
(``B = L`` with ``L Lᵀ = H + δI``, damped like the input side). The full ``B`` is applied to an
explicit ``Z = A W L`` on both sides (``Z Zᵀ`` or ``ZᵀZ``), without the blocked products.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
import scipy.linalg

from factorlm.decompose._transform import Transform, floored_scale, lowrank_from_transform
from factorlm.decompose._validate import (
    DecompositionError,
    cast_back,
    check_alpha,
    check_rank,
    check_vector,
    check_weight,
)
from factorlm.decompose.data_aware import (
    _damped_cholesky,
    asvd_transform,
    check_gram,
    check_output_gram,
    whiten_transform,
)
from factorlm.decompose.fisher import fisher_transform
from factorlm.decompose.svd import LowRank, SvdMethod, sketch_dtype

__all__ = [
    "METHODS",
    "Method",
    "MethodInputs",
    "PreparedWeight",
    "decompose",
    "prepare",
    "prepared_lowrank",
    "spectrum",
]

logger = logging.getLogger(__name__)

Method = Literal["svd", "whiten", "drone", "asvd", "fwsvd"]
METHODS: tuple[str, ...] = ("svd", "whiten", "drone", "asvd", "fwsvd")


@dataclass(frozen=True, eq=False)
class MethodInputs:
    """What a method reads besides the weight, held by reference (no copy): the gram for
    whiten/drone, mean |x| (and ``alpha``) for asvd, Fisher row sums for fwsvd.

    whiten/drone also take one loss weighting of the output side: ``output_weight`` (out,), a
    diagonal ``Σ_t g_t²``, or ``output_gram`` (out, out), the full ``H = Σ_t g_t g_tᵀ``.
    """

    gram: np.ndarray | None = None
    mean_abs: np.ndarray | None = None
    fisher: np.ndarray | None = None
    alpha: float = 0.5
    output_weight: np.ndarray | None = None  # whiten/drone: loss weight per output feature
    output_gram: np.ndarray | None = None  # whiten/drone: output-gradient Gram (out, out)


def _output_vector(shape: tuple[int, ...], method: str, inputs: MethodInputs) -> np.ndarray | None:
    """The per-output-feature weight ``b²`` of ``B = diag(b)``: FWSVD's Fisher row sums, or the
    loss-aware output Fisher that whiten/drone accept (``‖X (W − M) diag(b)‖``); else None."""
    if method == "fwsvd" and inputs.fisher is not None:
        return check_vector(
            inputs.fisher, shape[1], "fisher", what="Fisher row sums per output feature"
        )
    if method in ("whiten", "drone") and inputs.output_weight is not None:
        return check_vector(
            inputs.output_weight, shape[1], "output_weight", what="loss weight per output feature"
        )
    return None


def _output_factor(shape: tuple[int, ...], method: str, inputs: MethodInputs) -> np.ndarray | None:
    """Lower ``L`` with ``L Lᵀ = H + δI`` for whiten/drone given ``output_gram`` ``H``, else None.

    ``‖X (W − M) L‖² = tr((W − M)ᵀ XᵀX (W − M) (H + δI))``: the two-sided weighted objective. ``δ``
    follows the input side's adaptive damping, so a singular ``H`` (fewer tokens than outputs)
    never fails; an all-zero ``H`` carries no information and gives plain whitening.
    """
    if method not in ("whiten", "drone") or inputs.output_gram is None:
        return None
    if inputs.output_weight is not None:
        raise DecompositionError(
            "give output_weight (diagonal) or output_gram (full), not both: they weight the same "
            "output side."
        )
    factor = _damped_cholesky(check_output_gram(inputs.output_gram, shape[1]))
    return None if factor is None else factor[0]


def _statistic(shape: tuple[int, ...], method: str, inputs: MethodInputs) -> np.ndarray | None:
    """The checked float64 statistic ``method`` reads (None for svd); raises when it is missing.

    The gram for whiten and drone, mean |x| per input feature for asvd (``alpha`` checked too),
    Fisher row sums per output feature for fwsvd.
    """
    m, n = shape
    gram, mean_abs, fisher, alpha = inputs.gram, inputs.mean_abs, inputs.fisher, inputs.alpha
    if method == "svd":
        return None
    if method in ("whiten", "drone"):
        if gram is None:
            raise DecompositionError(f"method {method!r} needs gram (XᵀX of the weight's input).")
        return check_gram(gram, m)
    if method == "asvd":
        if mean_abs is None:
            raise DecompositionError("method 'asvd' needs mean_abs (mean |x| per input feature).")
        check_alpha(alpha)
        return check_vector(mean_abs, m, "mean_abs", what="mean |x| per input feature")
    if method == "fwsvd":
        if fisher is None:
            raise DecompositionError(
                "method 'fwsvd' needs fisher (Fisher row sums per output feature)."
            )
        return check_vector(fisher, n, "fisher", what="Fisher row sums per output feature")
    raise DecompositionError(f"method {method!r} is unknown; use one of {', '.join(METHODS)}.")


def _transform(weight: np.ndarray, method: str, inputs: MethodInputs) -> Transform:
    w64 = weight.astype(np.float64)
    stats = _statistic(weight.shape, method, inputs)
    if stats is None:
        return Transform(w64)
    if method == "asvd":
        return asvd_transform(w64, stats, float(inputs.alpha))
    if method == "fwsvd":
        return fisher_transform(w64, stats)
    whitened = whiten_transform(w64, stats)
    lower = _output_factor(weight.shape, method, inputs)
    if lower is not None:  # Z = A W L; undo G ↦ G L⁻¹ by one triangular solve

        def undo_full(right: np.ndarray) -> np.ndarray:
            return _solve_right(right, lower)

        return Transform(whitened.matrix @ lower, whitened.undo_left, undo_full)
    b = _output_scale(_output_vector(weight.shape, method, inputs))
    if b is None:
        return whitened

    def undo_right(right: np.ndarray) -> np.ndarray:
        return right / b[None, :]

    return Transform(whitened.matrix * b[None, :], whitened.undo_left, undo_right)


def _solve_right(right: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """``right @ inv(lower)`` for a lower-triangular ``lower``, by a triangular solve."""
    return scipy.linalg.solve_triangular(
        lower, right.T, trans="T", lower=True, check_finite=False
    ).T


def _output_scale(weights: np.ndarray | None) -> np.ndarray | None:
    """``b = √weights`` floored like FWSVD's scale (None: no output weighting)."""
    return None if weights is None else floored_scale(weights, 0.5)


def decompose(
    W: np.ndarray,
    method: Method | str,
    rank: int,
    *,
    gram: np.ndarray | None = None,
    mean_abs: np.ndarray | None = None,
    fisher: np.ndarray | None = None,
    alpha: float = 0.5,
    rng: np.random.Generator | None = None,
    svd_method: SvdMethod = "auto",
    output_weight: np.ndarray | None = None,
    output_gram: np.ndarray | None = None,
) -> LowRank:
    """Rank-``rank`` factors of ``W`` by ``method`` (svd, whiten, drone, asvd, fwsvd).

    ``output_weight`` (whiten/drone): a loss weight per output feature, e.g. the output Fisher
    ``Σ (∂L/∂y_j)²``; the objective becomes ``‖X (W − M) diag(√output_weight)‖``.
    ``output_gram`` (whiten/drone, instead): the full output-gradient Gram ``H = Σ_t g_t g_tᵀ``
    (out × out); the objective becomes ``‖X (W − M) H^{1/2}‖``, solved as ``A⁻¹ [A W L]_r L⁻¹``
    with ``L Lᵀ = H + δI`` (rank is invariant under invertible maps on either side).
    """
    weight = check_weight(W)
    r = check_rank(rank, weight.shape)
    inputs = MethodInputs(gram, mean_abs, fisher, alpha, output_weight, output_gram)
    transform = _transform(weight, method, inputs)
    return lowrank_from_transform(transform, r, weight.dtype, rng=rng, method=svd_method)


def spectrum(
    W: np.ndarray,
    method: Method | str,
    *,
    gram: np.ndarray | None = None,
    mean_abs: np.ndarray | None = None,
    fisher: np.ndarray | None = None,
    alpha: float = 0.5,
    output_weight: np.ndarray | None = None,
    output_gram: np.ndarray | None = None,
) -> np.ndarray:
    """Descending singular values of the matrix ``method`` truncates (float64, min(m, n) long)."""
    weight = check_weight(W)
    inputs = MethodInputs(gram, mean_abs, fisher, alpha, output_weight, output_gram)
    transform = _transform(weight, method, inputs)
    try:
        return scipy.linalg.svdvals(transform.matrix, check_finite=False)
    except np.linalg.LinAlgError:
        logger.debug("svdvals did not converge; retrying with gesvd")
        return scipy.linalg.svd(
            transform.matrix, compute_uv=False, check_finite=False, lapack_driver="gesvd"
        )


_DAMPING = 1e-10  # first step of data_aware's adaptive damping rule


def _tall_gram(
    weight: np.ndarray, method: str, inputs: MethodInputs
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(K, b)`` with ``K = Bᵀ Wᵀ AᵀA W B`` (out × out) and ``b`` the diagonal of B (or None)."""
    stats = _statistic(weight.shape, method, inputs)
    y, b = _output_scaled(weight, _output_vector(weight.shape, method, inputs))
    if stats is not None and method in ("whiten", "drone"):
        mean_diag = float(np.mean(np.diag(stats)))
        if mean_diag == 0.0:
            return y.T @ y, b
        k = y.T @ (stats @ y) + (_DAMPING * mean_diag) * (y.T @ y)
        return 0.5 * (k + k.T), b
    if stats is not None and method == "asvd":
        a = floored_scale(stats, inputs.alpha)
        if a is not None:
            scaled = a[:, None] * y
            return scaled.T @ scaled, b
    return y.T @ y, b


def _output_scaled(
    weight: np.ndarray, fisher: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(W B, b)`` in float64 with FWSVD's output scaling ``B = diag(b)``; ``(W, None)``
    without ``fisher`` (or with an all-zero one)."""
    y = weight.astype(np.float64)
    b = _output_scale(fisher)
    if b is not None:
        y = y * b[None, :]
    return y, b


def _eigh_descending(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values ``sqrt(λ)`` and eigenvectors of the Gram ``K``, largest first.

    One full ``eigh`` (LAPACK evr): on 768 × 768 it costs about a third of ``svdvals`` of the
    768 × 3072 weight, and a subset of vectors is not cheaper because the tridiagonal reduction
    dominates.
    """
    values, vectors = scipy.linalg.eigh(k, check_finite=False)
    return np.sqrt(np.maximum(values[::-1], 0.0)), vectors[:, ::-1]


@dataclass(frozen=True, eq=False)
class PreparedWeight:
    """One weight's spectrum under ``method`` and its leading singular vectors on the small side.

    ``side`` is ``"left"`` when ``in <= out`` (vectors are left singular vectors of ``Z``, in ×
    kept) and ``"right"`` otherwise (right singular vectors, out × kept). The statistics are held
    by reference (no copy) to rebuild the cheap side of the transform in ``lowrank``.
    """

    method: str
    shape: tuple[int, int]
    singular_values: np.ndarray
    side: Literal["left", "right"]
    vectors: np.ndarray
    stats: MethodInputs = field(repr=False)

    @property
    def kept(self) -> int:
        """How many leading singular vectors are stored (the largest rank ``lowrank`` serves)."""
        return int(self.vectors.shape[1])

    def lowrank(self, W: np.ndarray, rank: int) -> LowRank:
        """Rank-``rank`` factors of ``W`` for this method, equal to ``decompose`` with an exact SVD.

        ``W`` must be the weight that was prepared. A rank above ``kept`` takes one ``eigh`` of
        the same Gram. The products run over blocks of ``W`` (``_left_side_factors``,
        ``_right_side_factors``), so no float64 copy of the whole weight is made here.
        """
        weight = check_weight(W)
        if weight.shape != self.shape:
            raise DecompositionError(
                f"weight has shape {weight.shape} but was prepared with shape {self.shape}."
            )
        r = check_rank(rank, weight.shape)
        if r <= self.kept:
            vectors = self.vectors[:, :r].astype(np.float64)
            s = self.singular_values[:r]
        else:  # not cached: one eigendecomposition of the same Gram, now with vectors
            s, vectors = _eigh_descending(_small_gram(weight, self.method, self.stats))
            s, vectors = s[:r], vectors[:, :r].astype(np.float64)  # drops the other vectors
        # Products in blocks of W (bounded float64 working set), same numbers as whole matrices.
        if self.side == "right":
            left, right = _right_side_factors(weight, vectors, s, self.method, self.stats)
        elif _blockable(self.stats):
            left, right = _left_side_factors(weight, vectors, self.method, self.stats)
        else:  # a statistic the blocked products do not apply: the whole-matrix transform
            transform = _transform(weight, self.method, self.stats)
            raw = vectors.T @ transform.matrix  # (r, out) = diag(s) V_rᵀ
            norms = np.linalg.norm(raw, axis=1)
            t = np.where(norms > 0, np.sqrt(norms), 1.0)
            left = cast_back(transform.undo_left(vectors * t[None, :]), weight.dtype, "left")
            right = cast_back(transform.undo_right(raw / t[:, None]), weight.dtype, "right")
        return LowRank(left=left, right=right)


def prepare(
    W: np.ndarray,
    method: Method | str,
    *,
    gram: np.ndarray | None = None,
    mean_abs: np.ndarray | None = None,
    fisher: np.ndarray | None = None,
    alpha: float = 0.5,
    keep: int | None = None,
    output_weight: np.ndarray | None = None,
    output_gram: np.ndarray | None = None,
) -> PreparedWeight:
    """Spectrum and leading ``keep`` singular vectors (default all) of the matrix ``method``
    truncates, from one eigendecomposition of its Gram on the smaller side."""
    weight = check_weight(W)
    small = min(weight.shape)
    kept = small if keep is None else max(0, min(int(keep), small))
    stats = MethodInputs(gram, mean_abs, fisher, alpha, output_weight, output_gram)
    k = _small_gram(weight, method, stats)
    if kept == 0:  # spectrum only: eigenvalues without vectors, ~4x cheaper than eigh
        values = scipy.linalg.eigvalsh(k, check_finite=False)
        s = np.sqrt(np.maximum(values[::-1], 0.0))
        vectors = np.zeros((small, 0), dtype=sketch_dtype(weight))
    else:
        s, vectors = _eigh_descending(k)
        vectors = vectors[:, :kept].astype(sketch_dtype(weight), copy=False)
    return _prepared(weight, method, s, np.ascontiguousarray(vectors), stats)


def prepared_lowrank(
    W: np.ndarray,
    method: Method | str,
    rank: int,
    *,
    gram: np.ndarray | None = None,
    mean_abs: np.ndarray | None = None,
    fisher: np.ndarray | None = None,
    alpha: float = 0.5,
    output_weight: np.ndarray | None = None,
    output_gram: np.ndarray | None = None,
) -> LowRank:
    """Rank-``rank`` factors of ``W`` by ``method`` through the planner's path, in one ``eigh``.

    The same numbers as ``prepare(W, method, keep=0).lowrank(W, rank)`` (what ``compress`` does
    after planning), without the spectrum-only ``eigvalsh``: replaying a saved plan with this
    function reproduces a planned compression. Equal to ``decompose(..., svd_method="exact")``
    up to rounding.
    """
    weight = check_weight(W)
    r = check_rank(rank, weight.shape)
    stats = MethodInputs(gram, mean_abs, fisher, alpha, output_weight, output_gram)
    s, vectors = _eigh_descending(_small_gram(weight, method, stats))
    return _prepared(weight, method, s, vectors[:, :r], stats).lowrank(weight, r)


def _prepared(
    weight: np.ndarray, method: str, s: np.ndarray, vectors: np.ndarray, stats: MethodInputs
) -> PreparedWeight:
    """A ``PreparedWeight`` of ``weight``: vectors on the left when ``in <= out``, else right."""
    m, n = weight.shape
    side: Literal["left", "right"] = "left" if m <= n else "right"
    return PreparedWeight(str(method), (m, n), s, side, vectors, stats)


def _small_gram(weight: np.ndarray, method: str, inputs: MethodInputs) -> np.ndarray:
    """``Z Zᵀ`` (in ≤ out) or ``ZᵀZ`` computed without A (in > out), float64, symmetric.

    With a full ``output_gram`` both sides use the explicit ``Z = A W L`` (``A`` from the
    adaptively damped Cholesky, as ``decompose``), so every entry point truncates one matrix.
    """
    if weight.shape[0] <= weight.shape[1]:
        z = _transform(weight, method, inputs).matrix
        return z @ z.T
    if _output_factor(weight.shape, method, inputs) is not None:
        z = _transform(weight, method, inputs).matrix
        k = z.T @ z
        return 0.5 * (k + k.T)
    k, _ = _tall_gram(weight, method, inputs)
    return k


#: float64 values in one block of ``lowrank``'s products (8 MiB): its working set beyond the
#: weight, the Gram and the factors, however large the weight is.
_BLOCK_VALUES = 1 << 20

#: ``MethodInputs`` fields the blocked products know how to apply; any other field that is set
#: sends ``lowrank`` through the whole-matrix ``_transform`` instead (never a silent difference).
_BLOCKED_INPUTS = frozenset({"gram", "mean_abs", "fisher", "alpha", "output_weight"})


def _blocks(total: int, width: int, block_values: int | None) -> Iterator[slice]:
    """Consecutive slices over ``total`` rows (or columns) of ``width`` values each, about
    ``block_values`` (default ``_BLOCK_VALUES``) values per slice, at least one row each."""
    step = max(1, (block_values or _BLOCK_VALUES) // max(1, width))
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))


def _blockable(inputs: MethodInputs) -> bool:
    """Whether every statistic set in ``inputs`` is one the blocked products apply."""
    for item in fields(inputs):
        if item.name in _BLOCKED_INPUTS:
            continue
        value = getattr(inputs, item.name)
        if value is None or (not isinstance(value, np.ndarray) and value == item.default):
            continue
        return False
    return True


def _input_side(
    method: str, stats: np.ndarray | None, alpha: float
) -> tuple[Callable[[np.ndarray], np.ndarray] | None, Callable[[np.ndarray], np.ndarray] | None]:
    """``(A·, A⁻¹·)`` of ``_transform``'s ``Z = A W B`` as maps on float64 blocks (``None`` for
    ``A = I``): the same arithmetic as ``whiten_transform`` and ``asvd_transform``, so a column
    block of ``Z`` is bit-for-bit the same columns of ``_transform(W).matrix``."""
    if method in ("whiten", "drone") and stats is not None:
        factor = _damped_cholesky(stats)
        if factor is not None:
            upper = factor[0].T

            def whiten(block: np.ndarray) -> np.ndarray:
                return upper @ block

            def unwhiten(left: np.ndarray) -> np.ndarray:
                return scipy.linalg.solve_triangular(upper, left, lower=False, check_finite=False)

            return whiten, unwhiten
    if method == "asvd" and stats is not None:
        scale = floored_scale(stats, alpha)
        if scale is not None:
            column = scale[:, None]

            def scaled(block: np.ndarray) -> np.ndarray:
                return column * block

            def unscaled(left: np.ndarray) -> np.ndarray:
                return left / column

            return scaled, unscaled
    return None, None


def _left_side_factors(
    weight: np.ndarray,
    vectors: np.ndarray,
    method: str,
    inputs: MethodInputs,
    block_values: int | None = None,
    *,
    two_pass: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Factors from the left singular vectors ``U_r`` of ``Z = A W B`` (``in <= out``).

    ``raw = U_rᵀ Z`` (r × out) is formed a column block of ``W`` at a time, each block cast to
    float64 and transformed on its own, so neither a float64 copy of ``W`` nor ``Z`` is ever
    whole. Left ``A⁻¹ U_r diag(t)``, right ``diag(1/t) raw B⁻¹`` with ``t = √‖raw_i‖``.

    One pass keeps ``raw`` whole in float64 (8·r·out bytes) for its row norms: the numbers of the
    whole-matrix products bit for bit. It is used while that buffer and the cast factor fit in
    the float64 copy of ``W`` that ``_small_gram`` makes anyway (``r ≤ 2·in/3``); above, two
    passes (norms first, then each block scaled and cast as it comes, twice the products) keep
    the working set to the factors plus one block, with row norms summed block by block
    (within 1e-15 relative). ``two_pass`` forces either.
    """
    m, n = weight.shape
    r = vectors.shape[1]
    apply_a, undo_a = _input_side(method, _statistic(weight.shape, method, inputs), inputs.alpha)
    b = _output_scale(_output_vector(weight.shape, method, inputs))

    def products() -> Iterator[tuple[slice, np.ndarray]]:
        for cols in _blocks(n, m, block_values):
            z = weight[:, cols].astype(np.float64)
            if apply_a is not None:
                z = apply_a(z)
            if b is not None:
                z = z * b[None, cols]
            yield cols, vectors.T @ z

    if not (3 * r > 2 * m if two_pass is None else two_pass):
        raw = np.empty((r, n))
        for cols, block in products():
            raw[:, cols] = block
        norms = np.empty(r)
        for rows in _blocks(r, n, block_values):  # in blocks: no r × out temporary
            norms[rows] = np.linalg.norm(raw[rows], axis=1)
        t = np.where(norms > 0, np.sqrt(norms), 1.0)
        raw /= t[:, None]
        if b is not None:
            raw /= b[None, :]
        right = cast_back(raw, weight.dtype, "right")
        del raw
    else:
        squares = np.zeros(r)
        for _, block in products():
            squares += np.einsum("ij,ij->i", block, block)
        t = np.where(squares > 0, np.sqrt(np.sqrt(squares)), 1.0)
        right = np.empty((r, n), dtype=weight.dtype)
        for cols, block in products():
            block /= t[:, None]
            if b is not None:
                block /= b[None, cols]
            right[:, cols] = cast_back(block, weight.dtype, "right")
    left = vectors * t[None, :]
    if undo_a is not None:
        left = undo_a(left)
    return cast_back(left, weight.dtype, "left"), right


def _right_side_factors(
    weight: np.ndarray,
    vectors: np.ndarray,
    s: np.ndarray,
    method: str,
    inputs: MethodInputs,
    block_values: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Factors from the right singular vectors ``V_r`` of ``Z`` (``in > out``), ``A``-free.

    Left ``W B V_r diag(1/√s)`` a row block of ``W`` at a time (cast to the weight's dtype as
    it goes), right ``diag(√s) V_rᵀ B⁻¹``. ``B`` is ``diag(b)`` or, with a full ``output_gram``,
    the lower Cholesky factor ``L`` (then ``A⁻¹ Z V_r = W L V_r``: still no solve with ``A``).
    """
    m, n = weight.shape
    lower = _output_factor(weight.shape, method, inputs)
    b = None if lower is not None else _output_scale(_output_vector(weight.shape, method, inputs))
    t = np.where(s > 0, np.sqrt(s), 1.0)
    left = np.empty((m, vectors.shape[1]), dtype=weight.dtype)
    # With L: W L V_r = W (L V_r), one (out × r) product instead of a scaled copy per block.
    basis = vectors if lower is None else lower @ vectors
    for rows in _blocks(m, n, block_values):
        y = weight[rows].astype(np.float64)
        if b is not None:
            y = y * b[None, :]
        left[rows] = cast_back((y @ basis) / t[None, :], weight.dtype, "left")
    right = t[:, None] * vectors.T
    if b is not None:
        right = right / b[None, :]
    if lower is not None:
        right = _solve_right(right, lower)
    return left, cast_back(right, weight.dtype, "right")
