"""Which weights calibration collects statistics for, and which tensor feeds each of them.

Why here and not in the passes: calibration must run on the plain ``onnx`` protobuf (to add graph
outputs for ORT) and needs only one fact per weight: the name of its data input and whether that
input must be transposed (Gemm ``transA``) to read as rows of ``X`` in ``y = X @ W``.

A target is a MatMul or Gemm whose second input is a 2-D float initializer::

    X ──MatMul(X, W)──▶ Y            key W, activation X
    A ──Gemm(A, W, C; transA)──▶ Y   key W, activation A (rows of Aᵀ when transA=1)

With ``tied_heads``, an LM head tied to the token embedding (optimum's Llama export)::

    H ──MatMul(H, Transpose(E))──▶ logits   key E, activation H (in = E's width)

so a data-aware factorization of the shared embedding can weight its error by the head's input.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import onnx

from factorlm.errors import ConfigError

__all__ = ["Target", "find_targets"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


@dataclass(frozen=True)
class Target:
    """One weight to calibrate: its initializer, the activation feeding it, and its shape."""

    weight: str
    activation: str
    transpose: bool  # Gemm transA=1: the activation is stored (in, tokens)
    in_features: int
    out_features: int


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return default


def _transposed_weights(
    model: onnx.ModelProto, inits: dict[str, onnx.TensorProto]
) -> dict[str, str]:
    """``{Transpose output: initializer}`` for every 2-D transpose of a float initializer."""
    found: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if node.input[0] in inits and perm == [1, 0]:
            found[node.output[0]] = node.input[0]
    return found


def find_targets(
    model: onnx.ModelProto, weights: Collection[str] | None = None, *, tied_heads: bool = False
) -> list[Target]:
    """Targets of the main graph in node order; ``weights`` restricts them by initializer name.

    ``tied_heads`` adds every ``MatMul(H, Transpose(E))`` (a tied LM head, or any weight read
    through a Transpose), keyed by ``E``.
    """
    inits = {
        init.name: init
        for init in model.graph.initializer
        if len(init.dims) == 2 and init.data_type in _FLOAT_TYPES
    }
    transposed = _transposed_weights(model, inits) if tied_heads else {}
    targets: list[Target] = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in transposed:
            init = inits[transposed[node.input[1]]]
            rows, cols = int(init.dims[0]), int(init.dims[1])
            targets.append(Target(init.name, node.input[0], False, cols, rows))
            continue
        if len(node.input) < 2 or node.input[1] not in inits or node.input[0] in inits:
            continue
        init = inits[node.input[1]]
        rows, cols = int(init.dims[0]), int(init.dims[1])
        trans_b = node.op_type == "Gemm" and _attr(node, "transB") == 1
        in_features, out_features = (cols, rows) if trans_b else (rows, cols)
        transpose = node.op_type == "Gemm" and _attr(node, "transA") == 1
        targets.append(Target(init.name, node.input[0], transpose, in_features, out_features))
    if weights is not None:
        wanted = set(weights)
        found = {t.weight for t in targets}
        missing = sorted(wanted - found)
        if missing:
            raise ConfigError(
                f"Weight {missing[0]!r} is not a 2-D float MatMul/Gemm initializer of the model."
            )
        targets = [t for t in targets if t.weight in wanted]
    logger.info("Found %s calibration targets", len(targets))
    return targets
