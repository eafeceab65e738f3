"""Low-rank token embeddings: ``Gather(E, ids)`` → ``MatMul(Gather(P, ids), Q)``.

``E ≈ P @ Q`` with ``P: (vocab, r)`` and ``Q: (r, d)``: looking up rows of ``P`` and multiplying by
``Q`` equals looking up rows of ``P @ Q``. The Gather node keeps its name and now reads ``P``; a new
MatMul produces the original output value (same name, same consumers, graph output kept). An LM
head tied to ``E`` (directly or through a Transpose) is rewritten with the same ``P`` and ``Q``, so
the factors are stored once.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from factorlm.decompose import LowRank
from factorlm.passes.analysis import Candidate, Use
from factorlm.passes.base import PlannedFactorPass
from factorlm.passes.editor import GraphEditor
from factorlm.passes.linear import low_rank_values, rewrite_linear_use

__all__ = ["LowRankEmbeddingPass", "rewrite_gather_use"]

logger = logging.getLogger(__name__)


def rewrite_gather_use(editor: GraphEditor, use: Use, p: ir.Value, q: ir.Value) -> None:
    """``Gather(E, ids) -> y`` becomes ``Gather(P, ids) -> t``, ``MatMul(t, Q) -> y``."""
    gather = use.node
    new_out = editor.take_output(gather, "factorlm_lowrank")
    matmul = editor.node(
        "MatMul",
        [gather.outputs[0], q],
        name=f"{gather.name or 'Gather'}/factorlm_right",
        output=new_out,
    )
    gather.replace_input_with(0, p)
    editor.graph.insert_after(gather, matmul)


class LowRankEmbeddingPass(PlannedFactorPass[LowRank]):
    """Replace each planned embedding (and its tied LM head) by shared low-rank factors.

    Attributes:
        factors: initializer name -> ``LowRank`` of the embedding matrix ``(vocab, d)``.
    """

    summary = "Factorized %s embeddings"

    def _accepts(self, cand: Candidate) -> bool:
        return cand.kind == "embedding"

    def _rewrite(self, editor: GraphEditor, cand: Candidate, factors: LowRank) -> None:
        p, q = low_rank_values(editor, cand, factors)
        for use in cand.uses:
            if use.form == "gather":
                rewrite_gather_use(editor, use, p, q)
            else:
                rewrite_linear_use(editor, use, p, q)
