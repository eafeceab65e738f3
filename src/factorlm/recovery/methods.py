"""What ``losparse`` and ``dsee`` add to the distillation loop.

``losparse`` re-densifies each sparse residual to ``W − L R`` and prunes it by smoothed
importance ``|θ·∇θ|`` (EMA of importance times EMA of its deviation) on a cubic schedule down to
the plan's density; ``dsee`` freezes the factors and trains a rank-``k`` update plus a sparse
update on a fixed support, then merges them and prunes the result back to the plan's rank
(truncated SVD, a structured pruning of rank components).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from factorlm.errors import ConfigError
from factorlm.recovery.modules import FactorizedLinear, LowRankSparseLinear
from factorlm.recovery.schedule import density_at
from factorlm.recovery.settings import TrainConfig

__all__ = ["DseeLinear", "finish_method", "mask_sparse", "prune_step", "setup_method"]

logger = logging.getLogger(__name__)


class DseeLinear(nn.Module):
    """DSEE around a frozen ``FactorizedLinear``: ``base(x) + (x U) V + x (S ⊙ M)``."""

    mask: torch.Tensor

    def __init__(self, base: FactorizedLinear, original: torch.Tensor, rank: int, density: float):
        super().__init__()
        self.base = base
        for p in (base.first.weight, base.second.weight):
            p.requires_grad_(False)
        m, n = base.in_features, base.out_features
        generator = torch.Generator().manual_seed(m * 7919 + n)
        self.u = nn.Parameter(torch.randn(m, rank, generator=generator) / m**0.5)
        self.v = nn.Parameter(torch.zeros(rank, n))
        with torch.no_grad():
            residual = original - base.first.weight.T @ base.second.weight.T
            count = max(1, round(density * m * n))
            threshold = residual.abs().flatten().kthvalue(m * n - count + 1).values
            self.register_buffer("mask", (residual.abs() >= threshold).float())
        self.s = nn.Parameter(torch.zeros(m, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.u) @ self.v + x @ (self.s * self.mask)

    def merge(self) -> FactorizedLinear:
        """Fold the updates in, then keep the best rank-``r`` part (structured pruning)."""
        from factorlm.decompose import truncated_svd

        base = self.base
        with torch.no_grad():
            dense = (
                base.first.weight.T @ base.second.weight.T + self.u @ self.v + self.s * self.mask
            )
        low = truncated_svd(dense.double().numpy(), base.rank)
        bias = base.second.bias
        return FactorizedLinear.from_factors(
            low.left.astype(np.float32), low.right.astype(np.float32), bias
        )


def _weight(model: nn.Module, path: str) -> torch.Tensor:
    """The dense ``(in, out)`` weight of the ``nn.Linear`` at ``path``."""
    linear = model.get_submodule(path)
    assert isinstance(linear, nn.Linear)
    return linear.weight.detach().T


def setup_method(cfg: TrainConfig, student: nn.Module, teacher: nn.Module) -> dict[str, Any]:
    """Method-specific structure changes, made identically on fresh and resumed runs."""
    state: dict[str, Any] = {}
    if cfg.method == "losparse":
        found = False
        for path, module in student.named_modules():
            if not isinstance(module, LowRankSparseLinear):
                continue
            found = True
            module.expand()
            original = _weight(teacher, path)
            with torch.no_grad():
                low = module.first.weight.T @ module.second.weight.T
                module.sparse.copy_(original - low)
                module.mask.fill_(1.0)
            state[path] = {
                "imp": torch.zeros_like(module.sparse),
                "unc": torch.zeros_like(module.sparse),
            }
        if not found:
            raise ConfigError(
                "method 'losparse' needs a plan made with --method losparse (low-rank + sparse weights)."
            )
    elif cfg.method == "dsee":
        wrapped = 0
        for path, module in list(student.named_modules()):
            if type(module) is FactorizedLinear:
                original = _weight(teacher, path)
                parent_path, _, child = path.rpartition(".")
                parent = student.get_submodule(parent_path) if parent_path else student
                setattr(
                    parent, child, DseeLinear(module, original, cfg.dsee_rank, cfg.dsee_density)
                )
                wrapped += 1
        if not wrapped:
            raise ConfigError("method 'dsee' needs a plan with low-rank linear weights.")
    return state


def prune_step(cfg: TrainConfig, student: nn.Module, state: dict[str, Any], step: int) -> None:
    """LoSparse: update smoothed importance, then mask the least important sparse entries."""
    beta = cfg.importance_beta
    for path, st in state.items():
        module = student.get_submodule(path)
        assert isinstance(module, LowRankSparseLinear)
        grad = module.sparse.grad
        if grad is None:
            continue
        with torch.no_grad():
            score = (module.sparse * grad).abs()
            st["imp"].mul_(beta).add_(score, alpha=1 - beta)
            st["unc"].mul_(beta).add_((score - st["imp"]).abs(), alpha=1 - beta)
            density = density_at(cfg, step + 1, module.density)
            importance = (st["imp"] * st["unc"]) * module.mask
            m, n = importance.shape
            if module.structure == "column":
                rows = importance.sum(dim=1)
                keep = round(density * m)
                new = torch.zeros(m, dtype=torch.bool)
                if keep > 0:
                    new[torch.topk(rows, keep).indices] = True
                mask = new.unsqueeze(1).expand(m, n).float()
            elif module.structure == "2:4" and density <= module.density:
                continue  # 2:4 keeps the plan's pattern; only its values train
            else:
                keep = round(density * m * n)
                flat = torch.zeros(m * n)
                if keep > 0:
                    flat[torch.topk(importance.flatten(), keep).indices] = 1.0
                mask = flat.view(m, n)
            module.mask.mul_(mask)
            module.sparse.mul_(module.mask)


def mask_sparse(cfg: TrainConfig, student: nn.Module) -> None:
    """LoSparse, after each optimizer step: pruned sparse entries stay zero."""
    if cfg.method == "losparse":
        with torch.no_grad():
            for module in student.modules():
                if isinstance(module, LowRankSparseLinear):
                    module.sparse.mul_(module.mask)


def finish_method(cfg: TrainConfig, student: nn.Module) -> None:
    if cfg.method == "dsee":
        for path, module in list(student.named_modules()):
            if isinstance(module, DseeLinear):
                parent_path, _, child = path.rpartition(".")
                parent = student.get_submodule(parent_path) if parent_path else student
                setattr(parent, child, module.merge())
    if cfg.method == "losparse":
        for module in student.modules():
            if isinstance(module, LowRankSparseLinear):
                with torch.no_grad():
                    module.sparse.mul_(module.mask)
                module.compact()
