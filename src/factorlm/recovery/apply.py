"""Apply a factorlm plan (keyed by ONNX initializer name) to the Hugging Face PyTorch model.

Why the ONNX model is needed: the plan names initializers of the exported graph
(``onnx::MatMul_123`` is optimum's transposed copy of some ``nn.Linear.weight``). Those are
mapped back to PyTorch parameters by value with ``factorlm.calibration.map_to_onnx`` (the mapping
the Fisher statistics use), token embeddings by value against ``nn.Embedding`` weights. Each planned
module is then replaced by a factorized module (``factorlm.recovery.modules``) whose factors come
from ``factorlm.decompose`` with the plan's method, rank and statistics, computed from the very
matrix the graph passes see (``Candidate.matrix()``), so the exported student equals the
compressed graph before any training.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from factorlm.compress import factorize_entry
from factorlm.errors import PlanError
from factorlm.planning import Plan, StatsLike, validate_plan
from factorlm.recovery.modules import (
    FactorizedEmbedding,
    FactorizedLinear,
    KroneckerLinear,
    LowRankSparseLinear,
    SafeEmbedding,
)

__all__ = ["AppliedPlan", "apply_plan", "factorize_entry", "load_plan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppliedPlan:
    """Which module replaced which ONNX initializer: ``{onnx name: torch module path}``."""

    plan: Plan
    modules: dict[str, str]


def load_plan(plan: Plan | str | Path) -> Plan:
    """A Plan object, or one read from a JSON file (PlanError naming the file otherwise)."""
    if isinstance(plan, Plan):
        return plan
    path = Path(plan)
    if not path.is_file():
        raise PlanError(f"plan file {path} does not exist.")
    return Plan.from_json(path.read_text(encoding="utf-8"), source=str(path))


def _digest(array: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    a = np.ascontiguousarray(array, dtype=np.float32)
    return a.shape, hashlib.sha1(a.tobytes()).digest()


def _set_module(model: Any, path: str, module: Any) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def apply_plan(
    model: Any,
    plan: Plan | str | Path,
    onnx_model: str | Path,
    *,
    stats: StatsLike | None = None,
    safe: bool = False,
) -> AppliedPlan:
    """Replace the planned modules of ``model`` (in place) by factorized modules.

    ``onnx_model`` is the export the plan was made for; ``stats`` the calibration statistics a
    data-aware plan needs; ``safe`` turns factorized embeddings into SAFE embeddings. Raises
    PlanError when a planned weight has no PyTorch counterpart.
    """
    import onnx
    import torch

    from factorlm.calibration.fisher import map_to_onnx
    from factorlm.io import load_model
    from factorlm.passes import analyze

    chosen = load_plan(plan)
    joint = [name for name in chosen.weights if "+" in name]
    if joint:
        raise PlanError(
            f"plan weight {joint[0]!r} factorizes Q/K/V jointly, which recovery does not support "
            "yet; make the plan with `factorlm compress --separate-qkv`."
        )
    analysis = analyze(load_model(onnx_model), min_size=0)
    chosen = validate_plan(chosen, analysis)
    linear = {
        f"{name}.weight": mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and not isinstance(mod, FactorizedLinear)
    }
    embeddings = {
        name: mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Embedding)
    }
    params = {k: m.weight.detach().numpy() for k, m in linear.items()}
    proto = onnx.load(str(onnx_model))
    mapping = map_to_onnx(proto, params)
    embed_by_value = {_digest(m.weight.detach().numpy()): name for name, m in embeddings.items()}
    replaced: dict[str, str] = {}
    for name, entry in chosen.weights.items():
        cand = analysis.candidate(name)
        assert cand is not None  # validate_plan keeps candidates only
        matrix = cand.matrix()
        if cand.kind == "embedding":
            if any(use.form != "gather" for use in cand.uses):
                raise PlanError(
                    f"plan weight {name!r} is an embedding tied to an LM head; recovery does not "
                    "factorize tied embeddings yet."
                )
            path = embed_by_value.get(_digest(matrix))
            if path is None:
                raise PlanError(f"plan weight {name!r} matches no nn.Embedding of the model.")
            old = embeddings[path]
            low = factorize_entry(name, entry, matrix, stats)
            kind = SafeEmbedding if safe else FactorizedEmbedding
            _set_module(model, path, kind(low.left, low.right, old.padding_idx))
            replaced[name] = path
            continue
        hit = mapping.get(name)
        if hit is None:
            raise PlanError(f"plan weight {name!r} matches no nn.Linear weight of the model.")
        path = hit[0].removesuffix(".weight")
        old_linear = linear[hit[0]]
        if not np.array_equal(old_linear.weight.detach().numpy().T, matrix):
            raise PlanError(f"plan weight {name!r} is not {path}.weight in (in, out) layout.")
        factors = factorize_entry(name, entry, matrix, stats)
        bias = old_linear.bias
        new: torch.nn.Module
        if entry.method == "kron":
            new = KroneckerLinear(factors.a, factors.b, bias)
        elif entry.method == "losparse":
            assert entry.sparse is not None
            new = LowRankSparseLinear.from_sparse(
                factors.low_rank.left,
                factors.low_rank.right,
                factors.residual,
                bias,
                structure=str(entry.sparse["structure"]),
                density=float(entry.sparse["density"]),
            )
        else:
            new = FactorizedLinear.from_factors(factors.left, factors.right, bias)
        _set_module(model, path, new)
        replaced[name] = path
    logger.info("Replaced %d modules by factorized modules", len(replaced))
    return AppliedPlan(chosen, replaced)


def original_names(applied: AppliedPlan) -> Mapping[str, str]:
    """``{torch module path: ONNX initializer name}``: the inverse of ``AppliedPlan.modules``."""
    return {path: name for name, path in applied.modules.items()}
