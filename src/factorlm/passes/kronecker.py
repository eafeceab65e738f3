"""Kronecker rewrite: ``MatMul(x, W)`` with ``W ≈ Σᵢ Aᵢ ⊗ Bᵢ`` as two small batched MatMuls.

``W: (a_in·b_in, a_out·b_out)`` and ``kron(A, B)[p·b_in+q, s·b_out+t] = A[p,s]·B[q,t]``, so for one
token ``x`` viewed as ``X: (a_in, b_in)``, ``y`` viewed as ``Y: (a_out, b_out)`` is
``Σᵢ Aᵢᵀ X Bᵢ``. With ``T`` terms stacked (``Â = [A₁ᵀ; …; A_Tᵀ]: (T·a_out, a_in)`` and
``B̂ = [B₁; …; B_T]: (T·b_in, b_out)``)::

    X = Reshape(x, [-1, a_in, b_in])
    U = MatMul(Â, X)                                  (N, T·a_out, b_in)
    U = Reshape(U, [-1, T, a_out, b_in]) → Transpose(0, 2, 1, 3) → Reshape([-1, a_out, T·b_in])
    V = MatMul(U, B̂)                                  (N, a_out, b_out)   (the original node)
    y = Reshape(V, concat(shape(x)[:-1], [a_out·b_out]))

With one term the middle Reshape/Transpose/Reshape is skipped. Leading dimensions come from
``Shape(x)`` at run time, so any batch/sequence layout works.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from factorlm.passes.analysis import Candidate
from factorlm.passes.base import PlannedFactorPass
from factorlm.passes.editor import GraphEditor
from factorlm.planning import supports_kronecker

__all__ = ["KroneckerPass"]

if TYPE_CHECKING:  # only the factors' attributes are read here
    from factorlm.decompose import KroneckerFactors

logger = logging.getLogger(__name__)


def _ints(editor: GraphEditor, base: str, values: list[int]) -> ir.Value:
    return editor.initializer(base, np.asarray(values, dtype=np.int64))


class KroneckerPass(PlannedFactorPass["KroneckerFactors"]):
    """Replace each planned ``MatMul(x, W)`` by its sum-of-Kronecker-products form.

    Attributes:
        factors: initializer name -> ``KroneckerFactors`` (``a: (T, a_in, a_out)``,
            ``b: (T, b_in, b_out)``).
    """

    summary = "Factorized %s weights as Kronecker sums"

    def _accepts(self, cand: Candidate) -> bool:
        return supports_kronecker(cand) is None

    def _rewrite(self, editor: GraphEditor, cand: Candidate, factors: KroneckerFactors) -> None:
        kf = factors
        node = cand.uses[0].node
        base = node.name or "MatMul"
        terms, a_in, a_out = (int(d) for d in kf.a.shape)
        _, b_in, b_out = (int(d) for d in kf.b.shape)
        a_hat = np.concatenate([kf.a[i].T for i in range(terms)], axis=0)
        b_hat = np.concatenate([kf.b[i] for i in range(terms)], axis=0)
        a_val = editor.initializer(f"{cand.name}.factorlm_kron_a", a_hat, factor_of=cand.name)
        b_val = editor.initializer(f"{cand.name}.factorlm_kron_b", b_hat, factor_of=cand.name)
        x = node.inputs[0]
        assert x is not None
        new_nodes: list[ir.Node] = []

        def add(
            op: str, inputs: list[ir.Value | None], suffix: str, **attrs: int | float | list[int]
        ) -> ir.Value:
            created = editor.node(op, inputs, name=f"{base}/factorlm_kron_{suffix}", attrs=attrs)
            new_nodes.append(created)
            return created.outputs[0]

        tag = f"{cand.name}.factorlm_kron"
        xs = add("Reshape", [x, _ints(editor, f"{tag}_in_shape", [-1, a_in, b_in])], "in")
        u = add("MatMul", [a_val, xs], "a")
        if terms > 1:
            u = add(
                "Reshape", [u, _ints(editor, f"{tag}_split", [-1, terms, a_out, b_in])], "split"
            )
            u = add("Transpose", [u], "swap", perm=[0, 2, 1, 3])
            u = add(
                "Reshape", [u, _ints(editor, f"{tag}_merge", [-1, a_out, terms * b_in])], "merge"
            )
        shape = add("Shape", [x], "shape")
        lead = add(
            "Slice",
            [shape, _ints(editor, f"{tag}_zero", [0]), _ints(editor, f"{tag}_minus_one", [-1])],
            "lead",
        )
        out_shape = add(
            "Concat", [lead, _ints(editor, f"{tag}_out_dim", [a_out * b_out])], "out_shape", axis=0
        )
        editor.graph.insert_before(node, new_nodes)
        # The original node becomes V = MatMul(U, B̂); a final Reshape restores the output.
        node.replace_input_with(0, u)
        node.replace_input_with(1, b_val)
        final_out = editor.take_output(node, "factorlm_kron")
        final = editor.node(
            "Reshape",
            [node.outputs[0], out_shape],
            name=f"{base}/factorlm_kron_out",
            output=final_out,
        )
        editor.graph.insert_after(node, final)
