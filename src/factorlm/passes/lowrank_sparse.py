"""Low-rank plus sparse rewrite: ``MatMul(x, W)`` → ``MatMul(MatMul(x, L), R) + sparse branch``.

``W ≈ L @ R + S``. The sparse branch is stored in a form a backend can use:

- ``"column"``: ``S`` is non-zero on ``k`` input features only, so ``x @ S = x[..., rows] @ V``
  with ``V: (k, out)``: ``Gather(x, rows, axis=-1)`` then a compact MatMul.
- ``"2:4"`` and ``"unstructured"``: a dense residual MatMul ``x @ S`` whose zeros a sparse
  backend (TensorRT structured sparsity for 2:4) can exploit.

The original MatMul keeps its name and computes ``t @ R``; a new Add produces the original output
value from the two branches.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import onnx_ir as ir

from factorlm.passes.analysis import Candidate
from factorlm.passes.base import PlannedFactorPass
from factorlm.passes.editor import GraphEditor
from factorlm.planning import supports_lowrank_sparse

__all__ = ["LowRankSparsePass"]

if TYPE_CHECKING:  # only the factors' attributes are read here
    from factorlm.decompose import LowRankSparse

logger = logging.getLogger(__name__)


class LowRankSparsePass(PlannedFactorPass["LowRankSparse"]):
    """Replace each planned ``MatMul(x, W)`` by a low-rank branch plus a sparse branch.

    Attributes:
        factors: initializer name -> ``LowRankSparse``.
    """

    summary = "Factorized %s weights as low-rank + sparse"

    def _accepts(self, cand: Candidate) -> bool:
        return supports_lowrank_sparse(cand) is None

    def _rewrite(self, editor: GraphEditor, cand: Candidate, factors: LowRankSparse) -> None:
        lrs = factors
        node = cand.uses[0].node
        base = node.name or "MatMul"
        name = cand.name
        x = node.inputs[0]
        left = editor.initializer(f"{name}.factorlm_left", lrs.low_rank.left, factor_of=name)
        right = editor.initializer(f"{name}.factorlm_right", lrs.low_rank.right, factor_of=name)
        first = editor.node("MatMul", [x, left], name=f"{base}/factorlm_lowrank")
        branch: list[ir.Node] = [first]
        if lrs.structure == "column":
            assert lrs.rows is not None and lrs.values is not None
            rows = editor.initializer(f"{name}.factorlm_sparse_rows", lrs.rows, factor_of=name)
            values = editor.initializer(
                f"{name}.factorlm_sparse_values", lrs.values, factor_of=name
            )
            picked = editor.node(
                "Gather", [x, rows], name=f"{base}/factorlm_sparse_gather", axis=-1
            )
            sparse = editor.node(
                "MatMul", [picked.outputs[0], values], name=f"{base}/factorlm_sparse"
            )
            branch += [picked, sparse]
        else:
            residual = editor.initializer(f"{name}.factorlm_sparse", lrs.residual, factor_of=name)
            sparse = editor.node("MatMul", [x, residual], name=f"{base}/factorlm_sparse")
            branch.append(sparse)
        editor.graph.insert_before(node, branch)
        node.replace_input_with(0, first.outputs[0])
        node.replace_input_with(1, right)
        total = editor.take_output(node, "factorlm_lowrank")
        add = editor.node(
            "Add", [node.outputs[0], sparse.outputs[0]], name=f"{base}/factorlm_add", output=total
        )
        editor.graph.insert_after(node, add)
