"""Merge MatMuls that multiply the same activation by the same factor into one.

A model trained with a joint Q/K/V factorization (``factorlm.recovery``) computes the shared
down-projection once per member in PyTorch, so an exporter may write it once per member::

    t1 = MatMul(x, L)   q = MatMul(t1, Rq)          t = MatMul(x, L)
    t2 = MatMul(x, L)   k = MatMul(t2, Rk)    →     q = MatMul(t, Rq), k = MatMul(t, Rk), ...
    t3 = MatMul(x, L)   v = MatMul(t3, Rv)

The three compute the same tensor; keeping the first and pointing the others' consumers at its
output gives the joint form ``passes.joint`` writes, which ONNX Runtime engines fuse into one
Attention node (``factorlm.exporters.fusions``). No numbers change: only duplicate nodes go.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx_ir as ir

from factorlm.passes.analysis import factor_names

__all__ = ["MergeSharedMatMulsPass"]

logger = logging.getLogger(__name__)


class MergeSharedMatMulsPass(ir.passes.InPlacePass):
    """Keep one of the main graph's MatMuls that read the same activation and factor initializer.

    Only MatMuls whose weight is a named initializer are merged, and only a duplicate whose
    output is not a graph output (that name must stay). The kept node is the first in graph
    order, so it precedes every consumer it takes over.

    Attributes:
        names: the initializers whose duplicate MatMuls merge; None means every factor the
            model's ``factorlm.factors`` metadata records.
    """

    def __init__(self, names: Iterable[str] | None = None) -> None:
        super().__init__()
        self.names = frozenset(names) if names is not None else None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = self.names if self.names is not None else frozenset(factor_names(model))
        kept: dict[tuple[int, int], ir.Node] = {}
        merged = 0
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            if len(node.inputs) != 2 or len(node.outputs) != 1:
                continue
            x, weight = node.inputs
            if x is None or weight is None or weight.name not in names:
                continue
            if graph.initializers.get(weight.name) is not weight:
                continue
            first = kept.setdefault((id(x), id(weight)), node)
            if first is node or node.outputs[0].is_graph_output():
                continue
            node.outputs[0].replace_all_uses_with(first.outputs[0])
            graph.remove(node, safe=True)
            merged += 1
        logger.info("Merged %s duplicate factor MatMuls", merged)
        return ir.passes.PassResult(model, modified=merged > 0)
