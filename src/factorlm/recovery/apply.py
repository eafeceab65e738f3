"""Apply a factorlm plan (keyed by ONNX initializer name) to the Hugging Face PyTorch model.

Why the ONNX model is needed: the plan names initializers of the exported graph
(``onnx::MatMul_123`` is optimum's transposed copy of some ``nn.Linear.weight``). Those are
mapped back to PyTorch parameters by value with ``factorlm.calibration.map_to_onnx`` (the mapping
the Fisher statistics use), token embeddings by value against ``nn.Embedding`` weights. Each planned
module is then replaced by a factorized module (``factorlm.recovery.modules``) whose factors come
from ``factorlm.decompose`` with the plan's method, rank and statistics, computed from the very
matrix the graph passes see (``Candidate.matrix()``), so the exported student equals the
compressed graph before any training. A joint Q/K/V weight (``"<q>+<k>+<v>"``) is factorized as
the concatenation its joint candidate holds, exactly as ``passes.joint`` does; its members become
views of one ``JointFactorizedLinear`` that owns the shared ``L`` and the ``Rᵢ`` slices. A token
embedding tied to the LM head (SmolLM2) is factorized in the head's orientation, as the graph
pass does, and both uses share the factors: a ``FactorizedEmbedding`` for the lookup and a
``TiedFactorizedHead`` reading the same ``L`` and ``R`` for the logits.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from factorlm.compression import factorize_entry
from factorlm.errors import PlanError
from factorlm.passes.analysis import Candidate
from factorlm.passes.editor import stored_factors
from factorlm.passes.joint import JOINT_SEPARATOR, joint_statistics
from factorlm.planning import Plan, StatsLike, WeightPlan, load_plan, validate_plan
from factorlm.recovery.modules import (
    FactorizedEmbedding,
    FactorizedLinear,
    JointFactorizedLinear,
    JointProjection,
    KroneckerLinear,
    LowRankSparseLinear,
    SafeEmbedding,
    TiedFactorizedHead,
)

__all__ = ["AppliedPlan", "apply_plan", "factorize_entry", "load_plan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppliedPlan:
    """Which module replaced which ONNX initializer: ``{onnx name: torch module path}``."""

    plan: Plan
    modules: dict[str, str]


def _digest(array: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    a = np.ascontiguousarray(array, dtype=np.float32)
    return a.shape, hashlib.sha1(a.tobytes()).digest()


def _set_module(model: Any, path: str, module: Any) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _apply_joint(
    model: Any,
    name: str,
    entry: WeightPlan,
    cand: Candidate,
    matrix: np.ndarray,
    stats: StatsLike | None,
    mapping: Mapping[str, Any],
    linear: Mapping[str, Any],
) -> str:
    """Replace the members of joint candidate ``name`` by views of one ``JointFactorizedLinear``.

    The joint module is registered next to the first member (``<parent>.joint_<q>_<k>_<v>``);
    its path is returned. ``validate_plan`` has refused non-low-rank methods for joint weights. ``matrix`` is the members' ``(in, out)`` weights side by side.
    """
    paths: list[str] = []
    olds: list[Any] = []
    offset = 0
    for member in cand.members:
        hit = mapping.get(member)
        if hit is None:
            raise PlanError(
                f"member {member!r} of plan weight {name!r} matches no nn.Linear weight of the model."
            )
        old = linear[hit[0]]
        width = int(old.weight.shape[0])
        block = matrix[:, offset : offset + width]
        if not np.array_equal(old.weight.detach().numpy().T, block):
            raise PlanError(
                f"member {member!r} of plan weight {name!r} is not {hit[0]} in (in, out) layout."
            )
        paths.append(hit[0].removesuffix(".weight"))
        olds.append(old)
        offset += width
    low = factorize_entry(name, entry, matrix, stats)
    rights: list[np.ndarray] = []
    offset = 0
    for old in olds:
        width = int(old.weight.shape[0])
        rights.append(low.right[:, offset : offset + width])
        offset += width
    joint = JointFactorizedLinear(low.left, rights, [old.bias for old in olds])
    parent, _, _ = paths[0].rpartition(".")
    children = "_".join(p.rpartition(".")[2] for p in paths)
    path = f"{parent}.joint_{children}" if parent else f"joint_{children}"
    _set_module(model, path, joint)
    for index, member_path in enumerate(paths):
        _set_module(model, member_path, JointProjection(joint, index))
    return path


def _apply_embedding(
    model: Any,
    name: str,
    entry: WeightPlan,
    cand: Candidate,
    stats: StatsLike | None,
    embeddings: Mapping[str, Any],
    safe: bool,
) -> str:
    """Replace the embedding ``name`` by a factorized one (and its tied LM head); its path.

    A tied head (``cand`` has a linear use) must be the model's output embedding sharing the
    weight; it becomes a ``TiedFactorizedHead`` over the same factors. The core factors ``M ≈ L R``
    are laid out as the stored ``E ≈ P Q`` with ``stored_factors``, as the graph pass does.
    """
    stored = cand.stored()
    digest = _digest(stored)
    path = next(
        (p for p, m in embeddings.items() if _digest(m.weight.detach().numpy()) == digest), None
    )
    if path is None:
        raise PlanError(f"plan weight {name!r} matches no nn.Embedding of the model.")
    old = embeddings[path]
    tied = any(use.form != "gather" for use in cand.uses)
    head = model.get_output_embeddings() if tied else None
    if tied and getattr(head, "weight", None) is not old.weight:
        raise PlanError(
            f"plan weight {name!r} is an embedding shared with a linear node that is not the "
            "model's tied LM head; recovery factorizes only a tied LM head."
        )
    if tied and safe:
        raise PlanError(
            f"plan weight {name!r} is an embedding tied to an LM head; method 'safe' cannot "
            "factorize a tied embedding (the head would skip its attention)."
        )
    low = factorize_entry(name, entry, cand.matrix(), stats)
    p, q = stored_factors(cand, low.left, low.right)
    kind = SafeEmbedding if safe else FactorizedEmbedding
    module = kind(p, q, old.padding_idx)
    _set_module(model, path, module)
    if tied:
        model.set_output_embeddings(TiedFactorizedHead(module))
        # Stop transformers from re-tying a dense head to the factorized lookup later.
        model.config.tie_word_embeddings = False
    return path


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
    data-aware plan needs; ``safe`` turns factorized embeddings into SAFE embeddings. A joint
    weight (``"<q>+<k>+<v>"``, ``compress(joint_qkv=True)``) becomes one ``JointFactorizedLinear``
    whose ``JointProjection`` views replace the members; ``AppliedPlan.modules`` maps the joint
    name to the joint module. Raises PlanError when a planned weight has no PyTorch counterpart.
    """
    import onnx
    import torch

    from factorlm.calibration.fisher import map_to_onnx
    from factorlm.io import load_model
    from factorlm.passes import analyze

    chosen = load_plan(plan)
    # A plan with joint candidates ("<q>+<k>+<v>") needs the joint analysis, as compress does.
    joint = any(JOINT_SEPARATOR in name for name in chosen.weights)
    analysis = analyze(load_model(onnx_model), min_size=0, joint=joint)
    chosen = validate_plan(chosen, analysis)
    stats = joint_statistics(stats, analysis)
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
    replaced: dict[str, str] = {}
    for name, entry in chosen.weights.items():
        cand = analysis.candidate(name)
        assert cand is not None  # validate_plan keeps candidates only
        matrix = cand.matrix()
        if cand.kind == "embedding":
            replaced[name] = _apply_embedding(model, name, entry, cand, stats, embeddings, safe)
            continue
        if cand.members:
            replaced[name] = _apply_joint(model, name, entry, cand, matrix, stats, mapping, linear)
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
