"""Find the weights a factorization can rewrite, and say why every other one is left alone.

A weight is a 2-D float initializer of the main graph. It is factorizable when all its uses are
forms the rewrite passes understand::

    MatMul(x, W)            y = x @ W                 (core matrix W,   in = rows)
    MatMul(W, x)            y = W @ x                 (core matrix Wᵀ,  in = cols)
    Gemm(A, W, C; transB)   y = α·A' @ W' + β·C       (core matrix W',  bias C kept)
    Gemm(W, B, C; transA)   y = α·W' @ B' + β·C       (core matrix W'ᵀ)
    Gather(W, ids; axis=0)  token embedding           (core matrix W,   in = vocabulary)
    MatMul(h, Transpose(W)) LM head tied to the embedding through a Transpose

An embedding shared with one linear use (a tied LM head) is factorized once and both uses share
the factors; its core matrix is then the head's (``Eᵀ``, so the head's input statistics apply). Everything else is reported with a one-line reason: non-float or quantized weights,
weights shared in other ways, N-D tensors, small matrices and the factors of an earlier run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

__all__ = [
    "FACTOR_METADATA_KEY",
    "JOINT_SEPARATOR",
    "Analysis",
    "Candidate",
    "Skipped",
    "Use",
    "analyze",
    "factor_names",
    "group_siblings",
]

logger = logging.getLogger(__name__)

#: Model metadata key holding a JSON object ``{factor initializer: original initializer}``.
FACTOR_METADATA_KEY = "factorlm.factors"
#: Joins member initializer names into the name of a joint candidate.
JOINT_SEPARATOR = "+"

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}
_QUANTIZED_OPS = {
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "MatMulNBits",
    "QLinearMatMul",
    "QGemm",
    "GatherBlockQuantized",
}

Form = Literal["x@W", "W@x", "gemm_b", "gemm_a", "gather", "x@Wt"]


@dataclass(frozen=True)
class Use:
    """One use of a weight: the node, how the weight enters it, and whether it enters transposed.

    ``form`` is "x@W", "W@x", "gemm_b" (weight is Gemm's B), "gemm_a" (weight is Gemm's A),
    "gather" (embedding lookup) or "x@Wt" (MatMul(x, Transpose(W)), ``via`` is the Transpose).
    """

    node: ir.Node
    form: Form
    transposed: bool = False
    via: ir.Node | None = None

    @property
    def node_name(self) -> str:
        return self.node.name or f"<unnamed {self.node.op_type}>"


@dataclass(frozen=True)
class Candidate:
    """A factorizable weight: the stored matrix, its uses and its orientation for the core.

    The decomposition core sees ``matrix()``: the stored tensor, transposed when ``transposed``,
    so that it reads ``y = x @ M`` with ``M: (in_features, out_features)``.
    """

    name: str
    value: ir.Value
    kind: Literal["linear", "embedding"]
    stored_shape: tuple[int, int]
    transposed: bool
    uses: tuple[Use, ...]
    #: For a joint candidate (``analyze(..., joint=True)``): the member initializers whose
    #: matrices are concatenated along the output axis, in order; empty for a plain weight.
    members: tuple[str, ...] = ()
    #: The members' output widths, in order (their sum is the joint output width).
    member_widths: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        """(in_features, out_features) of the core matrix."""
        rows, cols = self.stored_shape
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def dtype(self) -> np.dtype:
        tensor = self.value.const_value
        assert tensor is not None
        return np.dtype(tensor.dtype.numpy())

    @property
    def node_names(self) -> list[str]:
        return [use.node_name for use in self.uses]

    def stored(self) -> np.ndarray:
        tensor = self.value.const_value
        assert tensor is not None
        return tensor.numpy()

    def matrix(self) -> np.ndarray:
        """The weight in the core's ``(in, out)`` orientation."""
        array = self.stored()
        return array.T if self.transposed else array


@dataclass(frozen=True)
class Skipped:
    """A weight left dense, with the reason in words."""

    name: str
    reason: str
    nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Analysis:
    """Every factorizable weight and every weight left alone, in graph order."""

    candidates: tuple[Candidate, ...]
    skipped: tuple[Skipped, ...]

    def candidate(self, name: str) -> Candidate | None:
        for cand in self.candidates:
            if cand.name == name:
                return cand
        return None


def factor_names(model: ir.Model) -> dict[str, str]:
    """Factors created by an earlier factorlm run: ``{factor name: original name}``."""
    raw = model.metadata_props.get(FACTOR_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _classify_use(node: ir.Node, index: int) -> Use | str:
    """How a weight enters ``node`` at input ``index``; a string is the reason it cannot."""
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    name = node.name or "<unnamed>"
    if node.op_type in _QUANTIZED_OPS:
        return f"quantized weight: feeds {node.op_type} node {name}"
    if op == "MatMul":
        return Use(node, "x@W" if index == 1 else "W@x")
    if op == "Gemm" and index in (0, 1):
        flag = _int_attr(node, "transB" if index == 1 else "transA", 0)
        return Use(node, "gemm_b" if index == 1 else "gemm_a", transposed=bool(flag))
    if op == "Gather" and index == 0:
        axis = _int_attr(node, "axis", 0)
        if axis != 0:
            return f"Gather node {name} reads it on axis {axis}, not 0"
        return Use(node, "gather")
    if op == "Transpose" and index == 0:
        perm = node.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            return f"Transpose node {name} uses perm {list(perm.as_ints())}"
        out = node.outputs[0]
        consumers = list(out.uses())
        if out.is_graph_output() or len(consumers) != 1:
            return f"its transpose ({name}) is used {len(consumers)} times"
        user, user_index = consumers[0].node, consumers[0].idx
        if user.op_type != "MatMul" or user.domain not in ("", "ai.onnx") or user_index != 1:
            return f"its transpose ({name}) feeds {user.op_type} node {user.name or '<unnamed>'}"
        return Use(user, "x@Wt", transposed=True, via=node)
    return f"also used by {op} node {name} (input {index})"


def _core_transposed(use: Use) -> bool:
    """Whether the core ``y = x @ M`` reads the stored weight transposed for this use.

    "W@x", "gemm_a": ``y = W' @ x``, so ``yᵀ = xᵀ @ W'ᵀ``; "x@Wt" and Gemm's ``transB`` read it
    transposed directly.
    """
    direct = use.form in ("x@W", "gemm_b", "x@Wt")
    return use.transposed if direct else not use.transposed


def _is_weight_consumer(node: ir.Node, index: int, value: ir.Value) -> bool:
    """Whether this use makes the initializer look like a weight worth reporting."""
    if node.op_type in ("MatMul", "Gemm") and index in (0, 1):
        return True
    if node.op_type in _QUANTIZED_OPS:
        return value.shape is not None and len(value.shape) >= 2
    if node.op_type == "Gather" and index == 0:
        return value.shape is not None and len(value.shape) == 2
    if node.op_type == "Transpose" and index == 0:
        out = node.outputs[0]
        return any(u.node.op_type in ("MatMul", "Gemm") for u in out.uses())
    return False


def _joinable(cand: Candidate) -> bool:
    use = cand.uses[0]
    return (
        cand.kind == "linear"
        and len(cand.uses) == 1
        and use.form == "x@W"
        and not cand.transposed
        and use.node.inputs[0] is not None
    )


def group_siblings(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Replace linear candidates that multiply the same activation by one joint candidate.

    Only ``MatMul(x, W)`` weights of one dtype join (Gemm and transposed forms keep their own
    factors); a group needs at least two members. The joint candidate takes the place of its
    first member.
    """
    by_input: dict[int, list[Candidate]] = {}
    for cand in candidates:
        if _joinable(cand):
            x = cand.uses[0].node.inputs[0]
            by_input.setdefault(id(x), []).append(cand)
    groups = {
        id(members[0]): members
        for members in by_input.values()
        if len(members) > 1 and len({m.dtype for m in members}) == 1
    }
    joined = {id(m) for members in groups.values() for m in members}
    result: list[Candidate] = []
    for cand in candidates:
        if id(cand) in groups:
            result.append(_joint_candidate(groups[id(cand)]))
        elif id(cand) not in joined:
            result.append(cand)
    if groups:
        logger.info("Grouped %d weights into %d joint candidates", len(joined), len(groups))
    return result


def _joint_candidate(members: Sequence[Candidate]) -> Candidate:
    name = JOINT_SEPARATOR.join(m.name for m in members)
    rows = members[0].stored_shape[0]
    cols = sum(m.stored_shape[1] for m in members)
    dtype = members[0].value.const_value.dtype  # type: ignore[union-attr]

    def concatenated() -> ir.TensorProtocol:
        return ir.tensor(np.concatenate([m.stored() for m in members], axis=1), name=name)

    # Lazy and uncached: the joint matrix exists only while a caller holds it (bounded memory).
    tensor = ir.LazyTensor(concatenated, dtype, ir.Shape((rows, cols)), name=name)
    value = ir.Value(
        name=name, shape=ir.Shape((rows, cols)), type=ir.TensorType(dtype), const_value=tensor
    )
    return Candidate(
        name=name,
        value=value,
        kind="linear",
        stored_shape=(int(rows), int(cols)),
        transposed=False,
        uses=tuple(u for m in members for u in m.uses),
        members=tuple(m.name for m in members),
        member_widths=tuple(int(m.stored_shape[1]) for m in members),
    )


def analyze(model: ir.Model, *, min_size: int = 0, joint: bool = False) -> Analysis:
    """Classify every weight-like initializer of the main graph as a candidate or skipped.

    ``min_size`` is the smallest number of elements worth factorizing. With ``joint``, linear
    weights that multiply the same activation (attention's Q/K/V) become one joint candidate
    (see ``factorlm.passes.joint``), so a plan can give them one shared down-projection.
    """
    graph = model.graph
    factors = factor_names(model)
    graph_inputs = set(graph.inputs)
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    for name, value in graph.initializers.items():
        uses = list(value.uses())
        if not any(_is_weight_consumer(u.node, u.idx, value) for u in uses):
            continue
        node_names = tuple(u.node.name or f"<unnamed {u.node.op_type}>" for u in uses)

        def skip(reason: str, *, _name: str = name, _nodes: tuple[str, ...] = node_names) -> None:
            skipped.append(Skipped(_name, reason, _nodes))

        if name in factors:
            skip(f"already a factor of {factors[name]} created by factorlm")
            continue
        tensor = value.const_value
        if tensor is None:
            skip("has no constant value")
            continue
        if value in graph_inputs:
            skip("is also a graph input, so it can be overridden at run time")
            continue
        if value.is_graph_output():
            skip("is also a graph output")
            continue
        if tensor.dtype not in _FLOAT_TYPES:
            quant = [u.node.op_type for u in uses if u.node.op_type in _QUANTIZED_OPS]
            if quant:
                skip(f"quantized weight ({tensor.dtype.name}) feeding {quant[0]}")
            else:
                skip(f"dtype {tensor.dtype.name} is not a float type")
            continue
        shape = tuple(int(d) for d in tensor.shape.numpy())
        if len(shape) != 2:
            skip(f"is {len(shape)}-D {list(shape)}, not a matrix")
            continue
        classified = [_classify_use(u.node, u.idx) for u in uses]
        reasons = [c for c in classified if isinstance(c, str)]
        if reasons:
            skip(reasons[0])
            continue
        good = [c for c in classified if isinstance(c, Use)]
        gathers = [u for u in good if u.form == "gather"]
        linear = [u for u in good if u.form != "gather"]
        if len(linear) > 1:
            names = ", ".join(u.node_name for u in linear)
            skip(
                f"shared by {len(linear)} linear nodes ({names}); only tied embeddings share factors"
            )
            continue
        rows, cols = shape
        if rows * cols < min_size:
            skip(f"has {rows * cols} elements, below min_size {min_size}")
            continue
        if gathers:
            # A tied LM head gives the core its orientation (logits = h @ Eᵀ: M = Eᵀ, in = the
            # hidden width), so a data-aware method weights the error by the head's inputs.
            transposed = _core_transposed(linear[0]) if linear else False
            shared = tuple(gathers + linear)
            candidates.append(Candidate(name, value, "embedding", (rows, cols), transposed, shared))
            continue
        use = linear[0]
        candidates.append(
            Candidate(name, value, "linear", (rows, cols), _core_transposed(use), (use,))
        )
    if joint:
        candidates = group_siblings(candidates)
    logger.info("Found %d factorizable weights, skipped %d", len(candidates), len(skipped))
    return Analysis(tuple(candidates), tuple(skipped))
