"""Count the fused operators that make an ONNX Runtime engine fast.

ONNX Runtime's transformer fusions need an *exact* subgraph: a factorized Q/K/V projection or a
re-ordered bias Add silently loses the Attention or SkipLayerNormalization fusion. Counting the
fused operators of the original and the compressed engine side by side makes such a loss visible
instead of showing up later as an unexplained slowdown.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from factorlm.exporters.shapes import load_onnx
from factorlm.passes.analysis import FACTOR_METADATA_KEY

__all__ = [
    "FUSED_OPS",
    "QUANTIZED_OPS",
    "CollapsedFactors",
    "FactorFusionReport",
    "collapse_factor_pairs",
    "count_fusions",
    "lost_fusions",
    "restore_factor_pairs",
    "tagged_factors",
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


# --------------------------------------------------------------------------------------------
# Fusing factorized models.
#
# ONNX Runtime's transformer optimizer matches exact subgraphs: ``SkipLN <- Add <- MatMul <-
# Reshape <- Transpose <- MatMul`` for the attention output and ``MatMul(x, W) + b`` for each of
# Q/K/V. A factorized projection (``MatMul(MatMul(x, L), R)``) breaks both, so the optimizer
# builds no Attention node, and then no EmbedLayerNormalization either (that fusion only fires
# when the embedding LayerNorm feeds an Attention node). Rather than re-implementing the
# optimizer's matcher, factorlm *collapses* each factor pair to one MatMul whose weight is the
# exact product ``L @ R`` (so the graph computes the same thing and matches every pattern), runs
# the optimizer, and then *restores* the factors: a MatMul keeps ``MatMul(MatMul(x, L), R)``;
# an Attention node built from a jointly factorized Q/K/V gets ``MatMul(x, L)`` as its input and
# ``[Rq Rk Rv]`` as its weight (the contrib op accepts an input width different from the
# hidden size). A product the restore cannot place stays dense, which is slower but exact.


@dataclass
class _Member:
    node: str  # the MatMul that multiplied by this member's right factor
    right: str  # right factor initializer name
    placeholder: str  # dense stand-in initializer name (left @ right)


@dataclass
class _Group:
    source: str  # the activation ``x`` feeding the shared down-projection
    left: str  # left factor initializer name
    down_node: str  # the down-projection MatMul's name
    down_out: str  # its output name ``t``
    members: list[_Member] = field(default_factory=list)


@dataclass
class CollapsedFactors:
    """What ``collapse_factor_pairs`` replaced, with the factor arrays needed to restore it."""

    groups: list[_Group] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # factor and stand-in values

    def __len__(self) -> int:
        return len(self.groups)


@dataclass(frozen=True)
class FactorFusionReport:
    """How the factors came back after the optimizer ran on the collapsed graph."""

    groups: int
    attention: int  # joint Q/K/V groups now feeding a fused Attention node
    matmul: int  # factor pairs restored as two MatMuls
    dense: tuple[str, ...]  # stand-ins left dense (the optimizer consumed them some other way)


def tagged_factors(model: onnx.ModelProto) -> set[str]:
    """Initializers listed in the model's ``factorlm.factors`` metadata: factorlm's factors,
    whatever their names (a recovered model's factors carry PyTorch's ``onnx::MatMul_*``)."""
    for prop in model.metadata_props:
        if prop.key == FACTOR_METADATA_KEY:
            try:
                data = json.loads(prop.value)
            except json.JSONDecodeError:
                return set()
            return set(data) if isinstance(data, dict) else set()
    return set()


def collapse_factor_pairs(model: onnx.ModelProto) -> CollapsedFactors:
    """Replace factor pairs that block ONNX Runtime's attention fusion by dense stand-ins, in place.

    Collapsed: a shared down-projection feeding two or more factor MatMuls (joint Q/K/V), and a
    single pair whose input comes from a Reshape (the attention output projection). Other pairs
    (feed-forward layers) do not block any fusion and are left alone. Stand-ins are exact
    ``L @ R`` products, so the collapsed model computes what the factorized one does.
    """
    factors = tagged_factors(model)
    result = CollapsedFactors()
    if not factors:
        return result
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def is_factor_matmul(node: onnx.NodeProto) -> bool:
        return (
            node.op_type == "MatMul"
            and node.domain in ("", "ai.onnx")
            and len(node.input) == 2
            and node.input[1] in factors
            and node.input[1] in inits
        )

    remove: list[onnx.NodeProto] = []
    for down in list(graph.node):
        if not is_factor_matmul(down) or len(consumers.get(down.input[1], [])) != 1:
            continue
        t = down.output[0]
        ups = consumers.get(t, [])
        if t in outputs or not ups or not all(is_factor_matmul(u) and u.input[0] == t for u in ups):
            continue
        source = producers.get(down.input[0])
        if len(ups) == 1 and (source is None or source.op_type != "Reshape"):
            continue
        left = onnx.numpy_helper.to_array(inits[down.input[1]])
        group = _Group(down.input[0], down.input[1], down.name, t)
        result.arrays[down.input[1]] = left
        for up in ups:
            right = onnx.numpy_helper.to_array(inits[up.input[1]])
            dense = (left.astype(np.float32) @ right.astype(np.float32)).astype(left.dtype)
            stand_in = f"{up.input[1]}.factorlm_dense"
            graph.initializer.append(onnx.numpy_helper.from_array(dense, stand_in))
            result.arrays[up.input[1]] = right
            result.arrays[stand_in] = dense
            group.members.append(_Member(up.name, up.input[1], stand_in))
            up.input[0] = down.input[0]
            up.input[1] = stand_in
        remove.append(down)
        result.groups.append(group)
    for node in remove:
        graph.node.remove(node)
    dropped = {g.left for g in result.groups} | {m.right for g in result.groups for m in g.members}
    _drop_initializers(graph, lambda init: init.name in dropped)
    logger.info("Collapsed %d factor groups for the transformer optimizer", len(result.groups))
    return result


def _drop_initializers(graph: onnx.GraphProto, drop: Callable[[onnx.TensorProto], bool]) -> None:
    """Delete the initializers ``drop`` picks, in place.

    Why not ``del graph.initializer[:]`` and ``extend(kept)``: protobuf copies every kept tensor
    on ``extend``, and the copies' memory comes on top of the originals' (protobuf arenas free
    only with the whole model), which doubles a large model's weights during its build.
    """
    for index in reversed(range(len(graph.initializer))):
        if drop(graph.initializer[index]):
            del graph.initializer[index]


def _column_order(
    weight: np.ndarray, members: list[_Member], arrays: dict[str, np.ndarray]
) -> list[_Member] | None:
    """Members in the order their stand-ins appear as column blocks of a fused weight."""
    ordered: list[_Member] = []
    offset = 0
    remaining = list(members)
    while remaining:
        for member in remaining:
            block = arrays[member.placeholder]
            width = block.shape[1]
            if offset + width <= weight.shape[1] and np.array_equal(
                weight[:, offset : offset + width], block
            ):
                ordered.append(member)
                remaining.remove(member)
                offset += width
                break
        else:
            return None
    return ordered if offset == weight.shape[1] else None


def _restore_attention(
    graph: onnx.GraphProto,
    inits: dict[str, onnx.TensorProto],
    fused: list[onnx.NodeProto],
    group: _Group,
    arrays: dict[str, np.ndarray],
) -> onnx.NodeProto | None:
    """The Attention node the optimizer built from ``group``'s stand-ins, its weight now ``R``.

    Found by content (its weight's column blocks are the stand-ins), because fusions rename the
    input (the embedding LayerNorm output becomes EmbedLayerNormalization's).
    """
    width = sum(arrays[m.placeholder].shape[1] for m in group.members)
    rows = arrays[group.members[0].placeholder].shape[0]
    for node in fused:
        tensor = inits.get(node.input[1]) if len(node.input) > 1 else None
        if tensor is None or list(tensor.dims) != [rows, width]:
            continue
        order = _column_order(onnx.numpy_helper.to_array(tensor), group.members, arrays)
        if order is None:
            continue
        right = np.concatenate([arrays[m.right] for m in order], axis=1)
        tensor.CopyFrom(onnx.numpy_helper.from_array(right, tensor.name))
        return node
    return None


def restore_factor_pairs(model: onnx.ModelProto, collapsed: CollapsedFactors) -> FactorFusionReport:
    """Put the factors back into an optimized model, in place (see ``collapse_factor_pairs``)."""
    graph = model.graph
    if not collapsed.groups:
        return FactorFusionReport(0, 0, 0, ())
    inits = {init.name: init for init in graph.initializer}

    def add_init(name: str) -> None:
        if name not in inits:
            tensor = onnx.numpy_helper.from_array(collapsed.arrays[name], name)
            graph.initializer.append(tensor)
            inits[name] = tensor

    def insert_down(group: _Group, source: str, before: onnx.NodeProto) -> str:
        """``MatMul(source, L)`` just before ``before``; fusions may have renamed ``x``."""
        add_init(group.left)
        node = onnx.helper.make_node(
            "MatMul", [source, group.left], [group.down_out], name=group.down_node
        )
        graph.node.insert(list(graph.node).index(before), node)
        return group.down_out

    attention = matmul = 0
    fused = [n for n in graph.node if n.op_type == "Attention" and n.domain == "com.microsoft"]
    for group in collapsed.groups:
        if len(group.members) > 1:
            found = _restore_attention(graph, inits, fused, group, collapsed.arrays)
            if found is not None:
                found.input[0] = insert_down(group, found.input[0], found)
                fused.remove(found)
                attention += 1
                continue
        down: str | None = None
        for member in group.members:
            users = [n for n in graph.node if member.placeholder in n.input]
            for node in users:
                if node.op_type != "MatMul" or node.input[1] != member.placeholder:
                    continue
                if down is None:
                    down = insert_down(group, node.input[0], node)
                add_init(member.right)
                node.input[0] = down
                node.input[1] = member.right
                matmul += 1
    used = {name for node in graph.node for name in node.input}
    dense = tuple(
        sorted(m.placeholder for g in collapsed.groups for m in g.members if m.placeholder in used)
    )
    _drop_initializers(
        graph, lambda init: init.name.endswith(".factorlm_dense") and init.name not in used
    )
    if dense:
        logger.warning(
            "%d factor products stayed dense after the optimizer: %s",
            len(dense),
            ", ".join(dense[:3]),
        )
    report = FactorFusionReport(len(collapsed.groups), attention, matmul, dense)
    logger.info("Restored factors: %s", report)
    return report
