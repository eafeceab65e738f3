"""Low-rank rewrite of linear nodes: ``MatMul(x, W)`` → ``MatMul(MatMul(x, P), Q)``.

With the stored weight ``S ≈ P @ Q`` (``P: (rows, r)``, ``Q: (r, cols)``), every linear form is
rewritten so that the *original node keeps its name, its output and its attributes*: a new node
computes the rank-r intermediate just before it, and the original node now multiplies by the other
factor. Bias Add, residual and LayerNorm neighbours are untouched, so ORT's fusions still see them::

    MatMul(x, S)               →  t = MatMul(x, P);              MatMul(t, Q)
    MatMul(S, x)               →  t = MatMul(Q, x);              MatMul(P, t)
    Gemm(A, S, C)              →  t = Gemm(A, P; transA);        Gemm(t, Q, C; α, β)
    Gemm(A, S, C; transB=1)    →  t = Gemm(A, Q; transA, transB); Gemm(t, P, C; transB=1, α, β)
    Gemm(S, B, C)              →  t = Gemm(Q, B; transB);        Gemm(P, t, C; α, β)
    Gemm(S, B, C; transA=1)    →  t = Gemm(P, B; transA, transB); Gemm(Q, t, C; transA=1, α, β)
    MatMul(x, Transpose(S))    →  t = MatMul(x, Transpose(Q));   MatMul(t, Transpose(P))
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from factorlm.decompose import LowRank
from factorlm.passes.analysis import Candidate, Use
from factorlm.passes.base import PlannedFactorPass
from factorlm.passes.editor import GraphEditor, stored_factors

__all__ = ["LowRankLinearPass", "low_rank_values", "rewrite_linear_use"]

logger = logging.getLogger(__name__)


def _attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def rewrite_linear_use(editor: GraphEditor, use: Use, p: ir.Value, q: ir.Value) -> None:
    """Rewrite one linear use of ``S`` to go through ``P`` then ``Q`` (``S ≈ P @ Q``)."""
    node = use.node
    base = node.name or node.op_type
    if use.form == "x@W":
        first = editor.node("MatMul", [node.inputs[0], p], name=f"{base}/factorlm_lowrank")
        node.replace_input_with(0, first.outputs[0])
        node.replace_input_with(1, q)
    elif use.form == "W@x":
        first = editor.node("MatMul", [q, node.inputs[1]], name=f"{base}/factorlm_lowrank")
        node.replace_input_with(0, p)
        node.replace_input_with(1, first.outputs[0])
    elif use.form == "gemm_b":
        trans_a = _attr(node, "transA", 0)
        if use.transposed:  # A' @ Sᵀ = (A' @ Qᵀ) @ Pᵀ
            first = editor.node(
                "Gemm",
                [node.inputs[0], q],
                name=f"{base}/factorlm_lowrank",
                transA=trans_a,
                transB=1,
            )
            node.replace_input_with(1, p)
        else:  # A' @ S = (A' @ P) @ Q
            first = editor.node(
                "Gemm", [node.inputs[0], p], name=f"{base}/factorlm_lowrank", transA=trans_a
            )
            node.replace_input_with(1, q)
        node.replace_input_with(0, first.outputs[0])
        editor.set_attr(node, "transA", 0)
    elif use.form == "gemm_a":
        trans_b = _attr(node, "transB", 0)
        if use.transposed:  # Sᵀ @ B' = Qᵀ @ (Pᵀ @ B')
            first = editor.node(
                "Gemm",
                [p, node.inputs[1]],
                name=f"{base}/factorlm_lowrank",
                transA=1,
                transB=trans_b,
            )
            node.replace_input_with(0, q)
        else:  # S @ B' = P @ (Q @ B')
            first = editor.node(
                "Gemm", [q, node.inputs[1]], name=f"{base}/factorlm_lowrank", transB=trans_b
            )
            node.replace_input_with(0, p)
        node.replace_input_with(1, first.outputs[0])
        editor.set_attr(node, "transB", 0)
    elif use.form == "x@Wt":
        assert use.via is not None
        transpose_q = editor.node("Transpose", [q], name=f"{base}/factorlm_transpose", perm=[1, 0])
        first = editor.node(
            "MatMul", [node.inputs[0], transpose_q.outputs[0]], name=f"{base}/factorlm_lowrank"
        )
        use.via.replace_input_with(0, p)  # the existing Transpose now yields Pᵀ
        editor.graph.insert_before(node, transpose_q)
        node.replace_input_with(0, first.outputs[0])
    else:  # pragma: no cover - analysis only produces the forms above
        raise ValueError(f"cannot rewrite form {use.form!r} of node {base}")
    editor.graph.insert_before(node, first)


def low_rank_values(
    editor: GraphEditor, cand: Candidate, low_rank: LowRank
) -> tuple[ir.Value, ir.Value]:
    """Register the stored-orientation factors ``(P, Q)`` of ``cand`` as tagged initializers."""
    p_arr, q_arr = stored_factors(cand, low_rank.left, low_rank.right)
    p = editor.initializer(f"{cand.name}.factorlm_left", p_arr, factor_of=cand.name)
    q = editor.initializer(f"{cand.name}.factorlm_right", q_arr, factor_of=cand.name)
    return p, q


class LowRankLinearPass(PlannedFactorPass[LowRank]):
    """Replace each planned linear weight by its low-rank factors.

    Attributes:
        factors: initializer name -> ``LowRank`` in the core's ``(in, out)`` orientation. Names
            that are not linear candidates of the model are ignored (the plan validates them).
    """

    summary = "Factorized %s linear weights"

    def _accepts(self, cand: Candidate) -> bool:
        return cand.kind == "linear"

    def _rewrite(self, editor: GraphEditor, cand: Candidate, factors: LowRank) -> None:
        p, q = low_rank_values(editor, cand, factors)
        rewrite_linear_use(editor, cand.uses[0], p, q)
