"""Count the fused operators that make an ONNX Runtime engine fast.

ONNX Runtime's transformer fusions need an *exact* subgraph: a factorized Q/K/V projection or a
re-ordered bias Add silently loses the Attention or SkipLayerNormalization fusion. Counting the
fused operators of the original and the compressed engine side by side makes such a loss visible
instead of showing up later as an unexplained slowdown.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping

import onnx
import onnx_ir as ir

from factorlm.exporters.shapes import load_onnx

__all__ = [
    "FUSED_OPS",
    "QUANTIZED_OPS",
    "count_fusions",
    "count_ops",
    "lost_fusions",
]

logger = logging.getLogger(__name__)

#: Fused operators produced by ONNX Runtime's graph optimizer and transformer optimizer.
FUSED_OPS: tuple[str, ...] = (
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "PackedAttention",
    "RotaryEmbedding",
    "EmbedLayerNormalization",
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "QuickGelu",
    "GemmFastGelu",
    "BiasAdd",
    "BiasSoftmax",
    "FusedMatMul",
    "FusedGemm",
    "MatMulNBits",
)

#: Quantized operators written by dynamic or static quantization.
QUANTIZED_OPS: tuple[str, ...] = (
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QAttention",
    "QEmbedLayerNormalization",
    "QLinearMatMul",
    "QGemm",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "DequantizeLinear",
)


def _iter_proto_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_proto_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _iter_proto_nodes(sub)


def _op_types(model: onnx.ModelProto | ir.Model | str | os.PathLike[str]) -> Iterable[str]:
    if isinstance(model, ir.Model):
        return (node.op_type for node in model.graph.all_nodes())
    if isinstance(model, onnx.ModelProto):
        return (node.op_type for node in _iter_proto_nodes(model.graph))
    proto = load_onnx(model)
    return [node.op_type for node in _iter_proto_nodes(proto.graph)]


def count_ops(model: onnx.ModelProto | ir.Model | str | os.PathLike[str]) -> dict[str, int]:
    """Count every operator type in ``model`` (subgraphs included), sorted by name."""
    counts = Counter(_op_types(model))
    return dict(sorted(counts.items()))


def count_fusions(
    model: onnx.ModelProto | ir.Model | str | os.PathLike[str],
    *,
    include_quantized: bool = True,
) -> dict[str, int]:
    """Count fused (and, by default, quantized) operators; every known name appears, zeros too.

    Stable keys let two engines be compared column by column in a manifest or report.
    """
    counts = Counter(_op_types(model))
    names = FUSED_OPS + (QUANTIZED_OPS if include_quantized else ())
    result = {name: counts.get(name, 0) for name in names}
    logger.debug("Fusion counts: %s", {k: v for k, v in result.items() if v})
    return result


def lost_fusions(reference: Mapping[str, int], candidate: Mapping[str, int]) -> dict[str, int]:
    """Fused operators that ``candidate`` has fewer of than ``reference``: name -> how many fewer."""
    lost = {
        name: count - candidate.get(name, 0)
        for name, count in reference.items()
        if count > candidate.get(name, 0)
    }
    if lost:
        logger.info("Fusions lost against the reference: %s", lost)
    return lost
