"""Remove the dense originals a factorization replaced, and nothing else.

onnx_ir's ``RemoveUnusedNodesPass`` would also delete dead code that was in the user's model; this
pass removes only initializers named by the plan once they have no use left, so the output differs
from the input exactly by the rewrite.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx_ir as ir

__all__ = ["RemoveReplacedWeightsPass"]

logger = logging.getLogger(__name__)


class RemoveReplacedWeightsPass(ir.passes.InPlacePass):
    """Delete the named initializers that no node, graph output or subgraph still uses.

    Attributes:
        names: initializer names the rewrite replaced.
    """

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        self.names = frozenset(names)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        removed = 0
        for name in sorted(self.names):
            value = graph.initializers.get(name)
            if value is None or value.uses() or value.is_graph_output() or value in graph.inputs:
                continue
            del graph.initializers[name]
            removed += 1
        logger.info("Removed %s replaced weights", removed)
        return ir.passes.PassResult(model, modified=removed > 0)
