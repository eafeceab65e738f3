"""Distillation losses (teacher = the original model, frozen; student = the factorized model).

- feature distillation (Ben Noach & Goldberg 2020, first phase): the mean over layers of the
  relative squared error of hidden states on real tokens, ``Σ‖h_s − h_t‖² / Σ‖h_t‖²``;
- output distillation (second phase): an encoder's last hidden state (relative squared error)
  plus ``1 − cos`` of mean-pooled embeddings; a classifier's or causal LM's logits by
  temperature-scaled KL; a causal LM may add ``lm_weight`` times the next-token cross-entropy
  on the text itself.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from factorlm.recovery.settings import TrainConfig

__all__ = ["distillation_loss", "model_kind", "next_token_loss"]

logger = logging.getLogger(__name__)


def model_kind(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "lm"
    if name.endswith("ForSequenceClassification"):
        return "classification"
    return "encoder"


def _relative_sq(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(a.dtype)
    return (((a - b) ** 2) * m).sum() / ((b**2) * m).sum().clamp_min(1e-12)


def _pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def _kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    log_s = torch.log_softmax(student / t, dim=-1)
    log_t = torch.log_softmax(teacher / t, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1) * t * t


def distillation_loss(
    kind: str,
    cfg: TrainConfig,
    feature: bool,
    s_out: Any,
    t_out: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    if feature:
        pairs = zip(s_out.hidden_states, t_out.hidden_states, strict=True)
        return torch.stack([_relative_sq(s, t, mask) for s, t in pairs]).mean()
    if kind == "encoder":
        s_h, t_h = s_out.last_hidden_state, t_out.last_hidden_state
        cos = torch.cosine_similarity(_pool(s_h, mask), _pool(t_h, mask), dim=-1)
        return _relative_sq(s_h, t_h, mask) + (1.0 - cos).mean()
    kl = _kl(s_out.logits, t_out.logits, cfg.temperature)
    if kind == "classification":
        return kl.mean()
    loss = (kl * mask).sum() / mask.sum().clamp_min(1)
    if cfg.lm_weight > 0:
        loss = loss + cfg.lm_weight * next_token_loss(s_out.logits, ids, mask)
    return loss


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting each real token from the ones before it."""
    scored = (mask[:, 1:] * mask[:, :-1]).reshape(-1).to(logits.dtype)
    nll = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    return (nll * scored).sum() / scored.sum().clamp_min(1)
