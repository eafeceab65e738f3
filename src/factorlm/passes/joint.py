"""Joint low-rank factorization of weights that read the same activation (attention's Q/K/V).

Q, K and V multiply the same input ``x``. Factorizing the concatenation ``[Wq Wk Wv] ≈ L R``
(``L: (in, r)``, ``R = [Rq Rk Rv]: (r, 3h)``) gives them one shared down-projection::

    q = x @ Wq + bq           t = MatMul(x, L)                  (new node, once)
    k = x @ Wk + bk    →      q = MatMul(t, Rq) + bq, k = MatMul(t, Rk) + bk, v = ...
    v = x @ Wv + bv

Each original MatMul keeps its name, output, bias Add and every consumer, so the graph stays pure
ONNX (TensorRT, any runtime); ONNX Runtime engines turn ``t`` and ``R`` into the fused
``com.microsoft.Attention`` op at build time (``factorlm.exporters.fusions``). A whitened
factorization needs no new statistics: the members share their input, so they share ``XᵀX``.

For planning, ``analyze(model, joint=True)`` (``analysis.group_siblings``) offers the group as one *virtual* weight named
``"<q>+<k>+<v>"`` whose matrix is the concatenation; the global rank allocation treats it like
any other weight.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import scipy.linalg

from factorlm.decompose import LowRank
from factorlm.passes.analysis import JOINT_SEPARATOR, Analysis, Candidate, analyze
from factorlm.passes.base import PlannedFactorPass
from factorlm.passes.editor import GraphEditor

__all__ = [
    "JOINT_SEPARATOR",
    "JointLinearPass",
    "joint_statistics",
    "member_names",
]

logger = logging.getLogger(__name__)


def member_names(names: Iterable[str], analysis: Analysis) -> list[str]:
    """Plan keys with every joint candidate replaced by its member initializers.

    The dense originals to remove after a rewrite are the members, not the virtual joint name.
    """
    result: list[str] = []
    for name in names:
        cand = analysis.candidate(name)
        if cand is not None and cand.members:
            result.extend(cand.members)
        else:
            result.append(name)
    return result


def joint_statistics(stats: Any, analysis: Analysis) -> Any:
    """A shallow copy of calibration ``stats`` that also answers for every joint candidate.

    Members share their input, so the joint weight's Gram and mean |x| are any member's; its
    Fisher row sums (per output feature) are the members' concatenated. Its full output-gradient
    Gram (``output_gram``) is the block diagonal of the members': the cross-member blocks
    ``Σ g_q g_kᵀ`` are never collected (each member's Gram comes from its own output), so the
    joint objective ignores correlations between Q, K and V outputs while keeping those within
    each. Entries a member lacks are left out, so a data-aware plan still fails with the member's
    name missing.
    """
    joint = [c for c in analysis.candidates if c.members]
    if stats is None or not joint:
        return stats
    result = copy.copy(stats)
    for key in ("gram", "mean_abs", "fisher", "output_fisher", "output_gram"):
        table = getattr(stats, key, None)
        if table is None:
            continue
        extended = dict(table)
        for cand in joint:
            if not all(m in table for m in cand.members):
                continue
            if key in ("fisher", "output_fisher"):
                extended[cand.name] = np.concatenate([table[m] for m in cand.members])
            elif key == "output_gram":
                extended[cand.name] = scipy.linalg.block_diag(*(table[m] for m in cand.members))
            else:
                extended[cand.name] = table[cand.members[0]]
        setattr(result, key, extended)
    return result


class JointLinearPass(PlannedFactorPass[LowRank]):
    """Give each planned joint candidate one shared ``MatMul(x, L)`` and per-member ``R`` slices.

    Attributes:
        factors: joint candidate name -> ``LowRank`` of the concatenated ``(in, Σ out)`` matrix.
            Names that are not joint candidates of the model are ignored.
    """

    summary = "Jointly factorized %s weight groups"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.factors:  # skip the (costly) joint analysis when nothing is planned
            return ir.passes.PassResult(model, modified=False)
        return super().call(model)

    def _candidates(self, model: ir.Model) -> Sequence[Candidate]:
        return analyze(model, joint=True).candidates

    def _accepts(self, cand: Candidate) -> bool:
        return bool(cand.members)

    def _rewrite(self, editor: GraphEditor, cand: Candidate, factors: LowRank) -> None:
        low_rank = factors
        graph = editor.graph
        # Earlier rewrites only insert nodes, so the members' relative order is the original one.
        order = {id(node): i for i, node in enumerate(graph)}
        nodes = [use.node for use in cand.uses]
        first = min(nodes, key=lambda n: order.get(id(n), 0))
        x = nodes[0].inputs[0]
        dtype = cand.dtype  # factors are stored in the weights' own dtype
        left = editor.initializer(
            f"{cand.members[0]}.factorlm_joint_left",
            low_rank.left.astype(dtype, copy=False),
            factor_of=cand.name,
        )
        base = first.name or "MatMul"
        down = editor.node("MatMul", [x, left], name=f"{base}/factorlm_joint")
        graph.insert_before(first, down)
        offset = 0
        for member, node in zip(cand.members, nodes, strict=True):
            tensor = graph.initializers[member].const_value
            assert tensor is not None  # analysis only groups constant initializers
            width = int(tensor.shape.numpy()[1])
            right = editor.initializer(
                f"{member}.factorlm_right",
                np.ascontiguousarray(low_rank.right[:, offset : offset + width], dtype=dtype),
                factor_of=member,
            )
            node.replace_input_with(0, down.outputs[0])
            node.replace_input_with(1, right)
            offset += width
