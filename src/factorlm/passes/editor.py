"""Small graph-building helpers shared by the rewrite passes: unique names, initializers, tags."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from factorlm.passes.analysis import FACTOR_METADATA_KEY, Candidate, factor_names

__all__ = ["GraphEditor", "stored_factors"]

logger = logging.getLogger(__name__)


def stored_factors(
    candidate: Candidate, left: np.ndarray, right: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``(P, Q)`` of the *stored* tensor ``S ≈ P @ Q`` from core factors ``M ≈ L @ R``.

    The core sees ``M = S`` or ``M = Sᵀ``; for ``M = Sᵀ``, ``S ≈ Rᵀ Lᵀ``. A layout change only.
    """
    if candidate.transposed:
        return np.ascontiguousarray(right.T), np.ascontiguousarray(left.T)
    return left, right


class GraphEditor:
    """Creates uniquely named values, initializers and nodes in one graph, and records factors.

    Attributes:
        graph: the main graph being edited.
        created: factor initializer name -> original initializer name, for the model tag.
    """

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self._names: set[str] = set(self.graph.initializers)
        self._names.update(v.name for v in self.graph.inputs if v.name)
        for node in ir.traversal.RecursiveGraphIterator(self.graph):
            self._names.update(v.name for v in node.outputs if v.name)
            if node.name:
                self._names.add(node.name)
        self.created: dict[str, str] = {}

    def unique(self, base: str) -> str:
        """``base``, or ``base_2``, ``base_3``... whichever is not yet used in the graph."""
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def initializer(
        self, base: str, array: np.ndarray, *, factor_of: str | None = None
    ) -> ir.Value:
        """Register ``array`` as a new initializer; ``factor_of`` tags it as a factorlm factor."""
        name = self.unique(base)
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        value = ir.Value(
            name=name,
            shape=ir.Shape(tensor.shape.numpy()),
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )
        self.graph.register_initializer(value)
        if factor_of is not None:
            self.created[name] = factor_of
        return value

    def value(self, base: str) -> ir.Value:
        return ir.Value(name=self.unique(base))

    def node(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        *,
        name: str,
        output: ir.Value | None = None,
        attrs: Mapping[str, int | float | list[int]] | None = None,
        **attributes: int | float | list[int],
    ) -> ir.Node:
        """A default-domain node with one output (a fresh value unless ``output`` is given)."""
        out = output if output is not None else self.value(f"{name}_out")
        attributes = {**(attrs or {}), **attributes}
        return ir.Node(
            "",
            op_type,
            inputs,
            attributes=[ir.convenience.convert_attribute(k, v) for k, v in attributes.items()],
            outputs=[out],
            name=self.unique(name),
        )

    def tag_model(self) -> None:
        """Merge the factors created so far into the model's ``factorlm.factors`` metadata."""
        if not self.created:
            return
        merged = factor_names(self.model)
        merged.update(self.created)
        self.model.metadata_props[FACTOR_METADATA_KEY] = json.dumps(merged, sort_keys=True)

    def take_output(self, node: ir.Node, suffix: str) -> ir.Value:
        """Detach ``node``'s output from its consumers and return a fresh value that now feeds them.

        The fresh value takes the original name (so graph outputs and downstream names are kept);
        the node's own output is renamed ``<name>_<suffix>`` and loses its shape. The caller
        must make a new node produce the returned value.
        """
        old_out = node.outputs[0]
        name = old_out.name or self.unique("output")
        new_out = ir.Value(name=None, shape=old_out.shape, type=old_out.type)
        ir.convenience.replace_all_uses_with(old_out, new_out, replace_graph_outputs=True)
        old_out.name = self.unique(f"{name}_{suffix}")
        old_out.shape = None
        new_out.name = name
        return new_out

    def set_attr(self, node: ir.Node, name: str, value: int | float) -> None:
        node.attributes[name] = ir.convenience.convert_attribute(name, value)
