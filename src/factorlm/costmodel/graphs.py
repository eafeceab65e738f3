"""Small ONNX graphs that time one weight shape, dense and factored, as an engine runs it.

For a weight ``W: (m, n)`` applied to ``x: (batch, seq, m)`` (a decode step: ``seq = 1``), each
form is written with the nodes its rewrite pass writes (``factorlm.passes``)::

    dense:      y = MatMul(x, W)
    lowrank:    y = MatMul(MatMul(x, L), R)                        L: (m, r), R: (r, n)
    losparse:   y = lowrank + MatMul(Gather(x, rows, axis=-1), V)   column structure, k rows
                y = lowrank + MatMul(x, S)                          2:4 / unstructured (S dense)
    kron:       Reshape → MatMul(Â, X) → [Reshape → Transpose → Reshape] → MatMul(U, B̂) → Reshape
    joint:      t = MatMul(x, L);  y_j = MatMul(t, R_j)  per member (dense: y_j = MatMul(x, W_j))

A *fused* joint form is what ONNX Runtime's Attention fusion runs: one product with the
concatenated ``(m, Σ h_j)`` weight (dense) or ``t @ [R_1 … R_k]`` (factored). Every graph holds
``copies`` independent products with their own weights (as the layers of a model have), so a
tiny product (a decode step) runs long enough to time and its weights are not all in cache.
Bias, activations and LayerNorm are the same in both forms and are left out. Weights are
random: the values do not change the time of a float or int8 product.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from factorlm.planning.latency import CurveSpec

__all__ = [
    "OPSET",
    "copies_for",
    "dense_graph",
    "factored_graph",
    "form_graph",
    "sparse_rows",
]

logger = logging.getLogger(__name__)

OPSET = 17
#: Rough multiply-add work per timed graph: enough that a run is well above timer noise.
_TARGET_FLOPS = 4e7
_MAX_COPIES = 8


def copies_for(tokens: int, m: int, n: int) -> int:
    """Independent copies of an ``(m, n)`` product per graph, so one run does enough work."""
    flops = 2.0 * tokens * m * n
    return int(min(_MAX_COPIES, max(1, np.ceil(_TARGET_FLOPS / max(flops, 1.0)))))


def sparse_rows(m: int, density: float) -> int:
    """Input rows a column-structured sparse part keeps (``decompose.sparse``: round(density·m))."""
    return max(1, round(density * m))


class _Builder:
    """Nodes and initializers of one graph; every name gets the copy's prefix."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def weight(self, name: str, shape: tuple[int, ...], scale: float) -> str:
        array = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, name: str, values: Sequence[int]) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def node(self, op: str, inputs: Sequence[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attrs))
        return output


#: Writes one copy's nodes reading ``x``; returns its output names.
_Form = Callable[[_Builder, str, str], list[str]]


def _matmul(b: _Builder, x: str, p: str, m: int, n: int, tag: str = "w") -> str:
    w = b.weight(f"{p}{tag}", (m, n), 1.0 / np.sqrt(m))
    return b.node("MatMul", [x, w], f"{p}{tag}_y")


def _pair(b: _Builder, x: str, p: str, m: int, n: int, rank: int) -> str:
    t = _matmul(b, x, p, m, rank, "l")
    return _matmul(b, t, p, rank, n, "r")


def _kron(
    b: _Builder, x: str, p: str, split: tuple[int, int, int, int], terms: int, out: int
) -> str:
    """The ``passes.kronecker`` subgraph: leading dimensions from ``Shape(x)`` at run time."""
    a_in, a_out, b_in, b_out = split
    xs = b.node("Reshape", [x, b.ints(f"{p}in_shape", [-1, a_in, b_in])], f"{p}xs")
    a_hat = b.weight(f"{p}a", (terms * a_out, a_in), 1.0 / np.sqrt(a_in))
    u = b.node("MatMul", [a_hat, xs], f"{p}u")
    if terms > 1:
        u = b.node("Reshape", [u, b.ints(f"{p}split", [-1, terms, a_out, b_in])], f"{p}split_y")
        u = b.node("Transpose", [u], f"{p}swap", perm=[0, 2, 1, 3])
        u = b.node("Reshape", [u, b.ints(f"{p}merge", [-1, a_out, terms * b_in])], f"{p}merge_y")
    shape = b.node("Shape", [x], f"{p}shape")
    lead = b.node(
        "Slice", [shape, b.ints(f"{p}zero", [0]), b.ints(f"{p}minus_one", [-1])], f"{p}lead"
    )
    target = b.node("Concat", [lead, b.ints(f"{p}out_dim", [out])], f"{p}out_shape", axis=0)
    b_hat = b.weight(f"{p}b", (terms * b_in, b_out), 1.0 / np.sqrt(terms * b_in))
    v = b.node("MatMul", [u, b_hat], f"{p}v")
    return b.node("Reshape", [v, target], f"{p}y")


def _losparse(
    b: _Builder, x: str, p: str, m: int, n: int, rank: int, structure: str, density: float
) -> str:
    low = _pair(b, x, p, m, n, rank)
    if structure == "column":
        k = sparse_rows(m, density)
        rows = b.ints(f"{p}rows", sorted(b.rng.choice(m, size=k, replace=False).tolist()))
        picked = b.node("Gather", [x, rows], f"{p}picked", axis=-1)
        sparse = _matmul(b, picked, p, k, n, "s")
    else:  # 2:4 and unstructured are stored as a dense residual product
        sparse = _matmul(b, x, p, m, n, "s")
    return b.node("Add", [low, sparse], f"{p}y")


def _form(spec: CurveSpec, rank: int | None) -> tuple[_Form, list[int]]:
    """The nodes of ``spec``'s form at ``rank`` (None: its dense original) and output widths."""
    m, n = spec.shape
    widths = list(spec.widths) if spec.form == "joint" and not spec.fused else [n]
    if rank is None:
        if len(widths) == 1:
            return (lambda b, x, p: [_matmul(b, x, p, m, n)]), widths
        return (
            lambda b, x, p: [_matmul(b, x, p, m, w, f"w{j}") for j, w in enumerate(widths)]
        ), widths
    if spec.form == "lowrank" or (spec.form == "joint" and spec.fused):
        return (lambda b, x, p: [_pair(b, x, p, m, n, rank)]), widths
    if spec.form == "joint":

        def joint(b: _Builder, x: str, p: str) -> list[str]:
            t = _matmul(b, x, p, m, rank, "l")
            return [_matmul(b, t, p, rank, w, f"r{j}") for j, w in enumerate(widths)]

        return joint, widths
    if spec.form == "losparse":
        assert spec.sparse is not None
        structure, density = spec.sparse
        return (lambda b, x, p: [_losparse(b, x, p, m, n, rank, structure, density)]), widths
    assert spec.form == "kron" and spec.kron is not None
    split = spec.kron
    return (lambda b, x, p: [_kron(b, x, p, split, rank, n)]), widths


def form_graph(
    spec: CurveSpec,
    rank: int | None,
    *,
    batch: int,
    seq: int,
    copies: int,
    rng: np.random.Generator,
) -> onnx.ModelProto:
    """``copies`` independent products of ``spec``'s form at ``rank`` (None: dense)."""
    build, widths = _form(spec, rank)
    b = _Builder(rng)
    outputs: list[onnx.ValueInfoProto] = []
    for i in range(copies):
        for name, width in zip(build(b, "x", f"c{i}_"), widths, strict=True):
            outputs.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, seq, width])
            )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, spec.shape[0]])
    label = "dense" if rank is None else f"{spec.form}_r{rank}"
    graph = helper.make_graph(b.nodes, f"{label}_{spec.key}", [x], outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def dense_graph(
    m: int, n: int, *, batch: int, seq: int, copies: int, rng: np.random.Generator
) -> onnx.ModelProto:
    """``copies`` dense products ``x @ W_i`` (``W_i: (m, n)``)."""
    spec = CurveSpec("lowrank", (m, n), (1,))
    return form_graph(spec, None, batch=batch, seq=seq, copies=copies, rng=rng)


def factored_graph(
    m: int, n: int, rank: int, *, batch: int, seq: int, copies: int, rng: np.random.Generator
) -> onnx.ModelProto:
    """``copies`` factored products ``(x @ L_i) @ R_i`` of rank ``rank``."""
    spec = CurveSpec("lowrank", (m, n), (rank,))
    return form_graph(spec, rank, batch=batch, seq=seq, copies=copies, rng=rng)
