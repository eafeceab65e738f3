"""PyTorch modules that hold factorized weights, so a plan can be applied and then trained.

Each module computes exactly what the matching graph pass computes, in the same orientation
(``y = x @ W`` with ``W: (in, out)``), so that before any training the exported ONNX equals the
rewritten graph:

- ``FactorizedLinear``: ``Linear(in, r, bias=False) -> Linear(r, out, bias)``; ``W ≈ L R``.
- ``JointFactorizedLinear`` + ``JointProjection``: sibling projections of one input (Q/K/V) share
  ``L``; ``[Wq Wk Wv] ≈ L [Rq Rk Rv]``, so member ``i`` computes ``(x @ L) @ Rᵢ + bᵢ``.
- ``FactorizedEmbedding``: ``Embedding(vocab, r) -> Linear(r, d, bias=False)``; ``E ≈ L R``.
- ``TiedFactorizedHead``: an LM head tied to a ``FactorizedEmbedding``, ``h Eᵀ ≈ (h Rᵀ) Lᵀ`` with
  the embedding's own factors, as ``passes.embedding`` rewrites a tied head.
- ``KroneckerLinear``: ``W ≈ Σᵢ Aᵢ ⊗ Bᵢ``; a token viewed as ``X: (a_in, b_in)`` maps to
  ``Σᵢ Aᵢᵀ X Bᵢ`` (two batched MatMuls, never the dense ``W``).
- ``LowRankSparseLinear``: ``x L R + x (S ⊙ M) + b`` with a mask ``M`` that LoSparse prunes.
- ``SafeEmbedding`` (Subformer's SAFE): the factorized lookup followed by a small single-head
  self-attention in the rank-``r`` space, residual, before the up-projection. Its output
  projection starts at zero, so at initialisation it equals ``FactorizedEmbedding``.

``factor_tensors()`` returns the tensors as they are exported (masks applied); the exporter
uses them to find the factors' initializers and tag them for the graph passes.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

__all__ = [
    "FactorizedEmbedding",
    "FactorizedLinear",
    "JointFactorizedLinear",
    "JointProjection",
    "KroneckerLinear",
    "LowRankSparseLinear",
    "SafeEmbedding",
    "TiedFactorizedHead",
    "is_factorized",
]

logger = logging.getLogger(__name__)


def _param(array: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).clone())


class FactorizedLinear(nn.Module):
    """``y = (x @ L) @ R + b`` as two ``nn.Linear`` layers, the way optimum exports them."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.rank, self.out_features = in_features, rank, out_features
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_factors(
        cls, left: np.ndarray, right: np.ndarray, bias: torch.Tensor | None
    ) -> FactorizedLinear:
        """``left: (in, r)``, ``right: (r, out)`` from ``factorlm.decompose``."""
        (m, r), n = left.shape, right.shape[1]
        module = cls(m, r, n, bias=bias is not None)
        module.first.weight = _param(left.T)
        module.second.weight = _param(right.T)
        if bias is not None:
            module.second.bias = nn.Parameter(bias.detach().clone())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def factor_tensors(self) -> list[torch.Tensor]:
        return [self.first.weight, self.second.weight]


class JointFactorizedLinear(nn.Module):
    """One shared ``L: (in, r)`` and per-member ``Rᵢ: (r, outᵢ)`` (+ bias): a joint Q/K/V.

    It owns every parameter once; the model calls it through ``JointProjection`` views put where
    the members' ``nn.Linear`` were. Each view computes ``x @ L`` itself, so the export holds one
    ``MatMul(x, L)`` per member; ``factorlm.passes.MergeSharedMatMulsPass`` merges them into the
    single down-projection ``passes.joint`` writes.
    """

    def __init__(
        self, left: np.ndarray, rights: list[np.ndarray], biases: list[torch.Tensor | None]
    ) -> None:
        super().__init__()
        if len(rights) != len(biases):
            raise ValueError(f"{len(rights)} right factors but {len(biases)} biases.")
        self.in_features, self.rank = left.shape
        self.left = _param(left)  # (in, r): exported as MatMul(x, L), no transposed copy
        self.rights = nn.ModuleList()
        for right, bias in zip(rights, biases, strict=True):
            if right.shape[0] != self.rank:
                raise ValueError(f"right factor {right.shape} does not have rank {self.rank}.")
            linear = nn.Linear(self.rank, right.shape[1], bias=bias is not None)
            linear.weight = _param(right.T)
            if bias is not None:
                linear.bias = nn.Parameter(bias.detach().clone())
            self.rights.append(linear)

    def right(self, index: int) -> nn.Linear:
        """Member ``index``'s ``Rᵢ`` (stored ``(outᵢ, r)``) and bias."""
        linear = self.rights[index]
        assert isinstance(linear, nn.Linear)
        return linear

    def project(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``: ``(x @ L) @ Rᵢ + bᵢ``."""
        return self.right(index)(torch.matmul(x, self.left))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        t = torch.matmul(x, self.left)
        return [self.right(i)(t) for i in range(len(self.rights))]

    def factor_tensors(self) -> list[torch.Tensor]:
        return [self.left, *(self.right(i).weight for i in range(len(self.rights)))]


class JointProjection(nn.Module):
    """Member ``index`` of a ``JointFactorizedLinear``, in place of that member's ``nn.Linear``.

    It holds no parameters: the joint module is registered once elsewhere in the model (so the
    state dict and optimizer see each factor once) and referenced here, not registered.
    """

    _joint: JointFactorizedLinear

    def __init__(self, joint: JointFactorizedLinear, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "_joint", joint)  # a plain reference, not a submodule
        self.index = index
        self.in_features = joint.in_features
        self.out_features = joint.right(index).out_features

    @property
    def joint(self) -> JointFactorizedLinear:
        return self._joint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._joint.project(x, self.index)


class LowRankSparseLinear(FactorizedLinear):
    """Low-rank plus a masked sparse residual: ``x L R + x (S ⊙ M) + b``.

    A ``column`` residual is kept compact outside LoSparse pruning (``compact()``): only the kept
    input features ``rows`` and their ``values`` are stored, and the forward pass is
    ``x[..., rows] @ values``, which exports as the Gather + MatMul the graph pass writes.

    Attributes:
        structure: "unstructured", "column" (whole input features) or "2:4".
        density: the target fraction of non-zeros of ``S`` (the plan's).
    """

    mask: torch.Tensor
    rows: torch.Tensor | None
    values: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        rank: int,
        out_features: int,
        bias: bool = True,
        *,
        structure: str = "unstructured",
        density: float = 0.0,
    ) -> None:
        super().__init__(in_features, rank, out_features, bias)
        self.structure, self.density = structure, density
        self.sparse = nn.Parameter(torch.zeros(in_features, out_features))
        self.register_buffer("mask", torch.zeros(in_features, out_features))
        self.register_buffer("rows", None)
        self.register_parameter("values", None)

    @classmethod
    def from_sparse(
        cls,
        left: np.ndarray,
        right: np.ndarray,
        residual: np.ndarray,
        bias: torch.Tensor | None,
        *,
        structure: str,
        density: float,
    ) -> LowRankSparseLinear:
        (m, r), n = left.shape, right.shape[1]
        module = cls(m, r, n, bias is not None, structure=structure, density=density)
        module.first.weight = _param(left.T)
        module.second.weight = _param(right.T)
        if bias is not None:
            module.second.bias = nn.Parameter(bias.detach().clone())
        module.sparse = _param(residual)
        with torch.no_grad():
            if structure == "column":
                module.mask.copy_((module.sparse != 0).any(dim=1, keepdim=True).expand(m, n))
                module.compact()
            else:
                module.mask.copy_((module.sparse != 0).float())
        return module

    def compact(self) -> None:
        """``column``: keep only the masked rows as ``rows`` / ``values`` (no-op otherwise)."""
        if self.structure != "column" or self.values is not None:
            return
        with torch.no_grad():
            rows = self.mask[:, 0].nonzero().squeeze(1)
            self.rows = rows
            self.values = nn.Parameter(self.sparse.detach()[rows].clone())
            self.sparse.zero_()

    def expand(self) -> None:
        """Back to the dense masked residual (for LoSparse pruning)."""
        if self.values is None or self.rows is None:
            return
        with torch.no_grad():
            self.sparse.zero_()
            self.sparse[self.rows] = self.values.detach()
            self.mask.zero_()
            self.mask[self.rows] = 1.0
        self.rows = None
        self.values = None

    def effective_sparse(self) -> torch.Tensor:
        if self.values is not None and self.rows is not None:
            dense = torch.zeros_like(self.sparse)
            return dense.index_copy(0, self.rows, self.values)
        return self.sparse * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.second(self.first(x))
        if self.values is not None and self.rows is not None:
            return low + x.index_select(-1, self.rows) @ self.values
        return low + x @ (self.sparse * self.mask)

    def factor_tensors(self) -> list[torch.Tensor]:
        if self.values is not None:
            return [self.first.weight, self.second.weight, self.values]
        return [self.first.weight, self.second.weight, self.effective_sparse()]


class KroneckerLinear(nn.Module):
    """``y = x @ Σᵢ kron(Aᵢ, Bᵢ) + b`` without forming the dense matrix."""

    def __init__(self, a: np.ndarray, b: np.ndarray, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.a = _param(a)  # (T, a_in, a_out)
        self.b = _param(b)  # (T, b_in, b_out)
        _, self.a_in, self.a_out = a.shape
        _, self.b_in, self.b_out = b.shape
        self.in_features = self.a_in * self.b_in
        self.out_features = self.a_out * self.b_out
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xs = x.reshape(-1, 1, self.a_in, self.b_in)
        xb = torch.matmul(xs, self.b)  # (N, T, a_in, b_out)
        y = torch.matmul(self.a.transpose(1, 2), xb).sum(dim=1)  # (N, a_out, b_out)
        y = y.reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def factor_tensors(self) -> list[torch.Tensor]:
        return [self.a, self.b]


class FactorizedEmbedding(nn.Module):
    """``Gather(L, ids) @ R``: a rank-``r`` lookup then an up-projection."""

    def __init__(self, left: np.ndarray, right: np.ndarray, padding_idx: int | None) -> None:
        super().__init__()
        vocab, rank = left.shape
        self.num_embeddings, self.rank, self.embedding_dim = vocab, rank, right.shape[1]
        self.padding_idx = padding_idx
        self.embed = nn.Embedding(vocab, rank)
        self.embed.weight = _param(left)
        self.proj = nn.Linear(rank, right.shape[1], bias=False)
        self.proj.weight = _param(right.T)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))

    def factor_tensors(self) -> list[torch.Tensor]:
        return [self.embed.weight, self.proj.weight]


class SafeEmbedding(FactorizedEmbedding):
    """SAFE: factorized lookup, a small self-attention over the rank-``r`` vectors, projection.

    Padding tokens (``ids == padding_idx``) are masked out as keys, so a sentence's vectors do
    not depend on how much padding its batch has. ``out`` starts at zero: at initialisation the
    module equals ``FactorizedEmbedding`` exactly.
    """

    def __init__(self, left: np.ndarray, right: np.ndarray, padding_idx: int | None) -> None:
        super().__init__(left, right, padding_idx)
        r = self.rank
        self.qkv = nn.Linear(r, 3 * r)
        self.out = nn.Linear(r, r)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.qkv.weight.normal_(0.0, 1.0 / math.sqrt(r), generator=generator)
            self.qkv.bias.zero_()
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(ids)
        q, k, v = self.qkv(e).chunk(3, dim=-1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.rank)
        if self.padding_idx is not None:
            pad = (ids == self.padding_idx).unsqueeze(-2)
            scores = scores.masked_fill(pad, -1e4)
        attended = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.proj(e + self.out(attended))

    def factor_tensors(self) -> list[torch.Tensor]:
        return [*super().factor_tensors(), self.qkv.weight, self.out.weight]


class TiedFactorizedHead(nn.Module):
    """An LM head tied to a ``FactorizedEmbedding``: ``logits = (h @ Rᵀ) @ Lᵀ``.

    Why not a ``FactorizedLinear``: the head and the lookup share ``L: (vocab, r)`` and
    ``R: (r, d)``, so training updates one pair and the export stores each factor once, as the
    graph rewrite of a tied head does. Like ``JointProjection`` it holds no parameters: the
    embedding is referenced, not registered, so the state dict and optimizer see each factor once.
    """

    _embedding: FactorizedEmbedding

    def __init__(self, embedding: FactorizedEmbedding) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # a plain reference, not a submodule
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings

    @property
    def embedding(self) -> FactorizedEmbedding:
        return self._embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # proj.weight is Rᵀ (d, r); embed.weight is L (vocab, r).
        reduced = torch.matmul(hidden, self._embedding.proj.weight)
        return nn.functional.linear(reduced, self._embedding.embed.weight)


def is_factorized(module: nn.Module) -> bool:
    """Whether ``module`` is one of the factorized modules above."""
    return isinstance(
        module,
        FactorizedLinear
        | JointFactorizedLinear
        | JointProjection
        | KroneckerLinear
        | FactorizedEmbedding
        | TiedFactorizedHead,
    )
