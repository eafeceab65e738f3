"""Small ONNX graphs that time one weight shape, dense and factored, as an engine runs it.

For a weight ``W: (m, n)`` applied to ``x: (batch, seq, m)``::

    dense:     y_i = MatMul(x, W_i)                       i = 1..copies
    factored:  t_i = MatMul(x, L_i),  y_i = MatMul(t_i, R_i)      L_i: (m, r), R_i: (r, n)

Copies are independent products with their own weights (as the layers of a model have), so a
tiny product (a decode step) runs long enough to time and its weights are not all in cache. A
joint Q/K/V weight is timed as its concatenated ``(m, 3h)`` matrix: ONNX Runtime's fused
Attention runs that one product. Bias, activations and LayerNorm are the same in both forms and
are left out. Weights are random: the values do not change the time of a float or int8 product.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["OPSET", "copies_for", "dense_graph", "factored_graph"]

logger = logging.getLogger(__name__)

OPSET = 17
#: Rough multiply-add work per timed graph: enough that a run is well above timer noise.
_TARGET_FLOPS = 4e7
_MAX_COPIES = 8


def copies_for(tokens: int, m: int, n: int) -> int:
    """Independent copies of an ``(m, n)`` product per graph, so one run does enough work."""
    flops = 2.0 * tokens * m * n
    return int(min(_MAX_COPIES, max(1, np.ceil(_TARGET_FLOPS / max(flops, 1.0)))))


def _graph(
    name: str,
    weights: list[list[np.ndarray]],
    batch: int,
    seq: int,
    m: int,
    n: int,
) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, m])
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    for i, chain in enumerate(weights):
        source = "x"
        for j, matrix in enumerate(chain):
            wname = f"w{i}_{j}"
            inits.append(numpy_helper.from_array(matrix.astype(np.float32), wname))
            out = f"y{i}" if j == len(chain) - 1 else f"t{i}_{j}"
            nodes.append(helper.make_node("MatMul", [source, wname], [out], name=f"mm{i}_{j}"))
            source = out
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [batch, seq, n]))
    graph = helper.make_graph(nodes, name, [x], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def dense_graph(
    m: int, n: int, *, batch: int, seq: int, copies: int, rng: np.random.Generator
) -> onnx.ModelProto:
    """``copies`` dense products ``x @ W_i`` (``W_i: (m, n)``)."""
    scale = 1.0 / np.sqrt(m)
    weights = [[rng.standard_normal((m, n)) * scale] for _ in range(copies)]
    return _graph(f"dense_{m}x{n}", weights, batch, seq, m, n)


def factored_graph(
    m: int, n: int, rank: int, *, batch: int, seq: int, copies: int, rng: np.random.Generator
) -> onnx.ModelProto:
    """``copies`` factored products ``(x @ L_i) @ R_i`` of rank ``rank``."""
    scale = 1.0 / np.sqrt(m)
    weights = [
        [rng.standard_normal((m, rank)) * scale, rng.standard_normal((rank, n)) / np.sqrt(rank)]
        for _ in range(copies)
    ]
    return _graph(f"factored_{m}x{n}_r{rank}", weights, batch, seq, m, n)
