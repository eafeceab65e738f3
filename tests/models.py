"""Tiny ONNX graphs built in code, shared by the test suites.

Every builder returns an ``onnx.ModelProto`` with dynamic batch/sequence axes, a fixed opset,
metadata and a doc string, so tests can check that rewrites preserve them. Weights come from an
explicit seed; shapes are small enough that a test runs in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "OPSET",
    "attention_block",
    "embedding_lm",
    "gemm_model",
    "left_matmul",
    "mlp",
    "quantized_model",
    "random_weight",
    "run_ort",
    "sequence_model",
    "write_model",
]

OPSET = 17


def random_weight(rows: int, cols: int, seed: int, *, decay: float = 0.0) -> np.ndarray:
    """A float32 matrix; with ``decay`` > 0 its singular values fall off like exp(-decay*i)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols))
    if decay > 0:
        u, _, vt = np.linalg.svd(w, full_matrices=False)
        s = np.exp(-decay * np.arange(min(rows, cols)))
        w = (u * s) @ vt
    return (w / np.sqrt(rows)).astype(np.float32)


def _finish(graph: onnx.GraphProto, *, opset: int = OPSET) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="factorlm-tests",
        doc_string="tiny test model",
    )
    model.ir_version = 8
    helper.set_model_props(model, {"author": "tests", "purpose": "factorization"})
    onnx.checker.check_model(model, full_check=True)
    return model


def sequence_model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    *,
    name: str,
    d_in: int,
    d_out: int,
    output: str = "y",
) -> onnx.ModelProto:
    """A checked model of ``nodes`` from ``x[batch, seq, d_in]`` to ``output[batch, seq, d_out]``."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d_in])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", "seq", d_out])],
        inits,
    )
    return _finish(graph)


def mlp(
    d_in: int = 32, hidden: int = 64, d_out: int = 24, *, seed: int = 0, decay: float = 0.0
) -> onnx.ModelProto:
    """x[batch, seq, d_in] -> MatMul W1 -> Add b1 -> Relu -> MatMul W2 -> Add b2 -> y."""
    w1 = random_weight(d_in, hidden, seed, decay=decay)
    w2 = random_weight(hidden, d_out, seed + 1, decay=decay)
    b1 = np.linspace(-0.1, 0.1, hidden, dtype=np.float32)
    b2 = np.linspace(0.1, -0.1, d_out, dtype=np.float32)
    return sequence_model(
        [
            helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"], name="fc1/MatMul"),
            helper.make_node("Add", ["h0", "fc1.bias"], ["h1"], name="fc1/Add"),
            helper.make_node("Relu", ["h1"], ["h2"], name="act"),
            helper.make_node("MatMul", ["h2", "fc2.weight"], ["h3"], name="fc2/MatMul"),
            helper.make_node("Add", ["h3", "fc2.bias"], ["y"], name="fc2/Add"),
        ],
        [
            numpy_helper.from_array(w1, "fc1.weight"),
            numpy_helper.from_array(b1, "fc1.bias"),
            numpy_helper.from_array(w2, "fc2.weight"),
            numpy_helper.from_array(b2, "fc2.bias"),
        ],
        name="mlp",
        d_in=d_in,
        d_out=d_out,
    )


def gemm_model(
    k: int = 40,
    n: int = 48,
    *,
    trans_b: int = 1,
    alpha: float = 0.5,
    beta: float = 2.0,
    seed: int = 3,
) -> onnx.ModelProto:
    """x[batch, k] -> Gemm(x, W, b; transB, alpha, beta) -> y[batch, n]."""
    w = random_weight(k, n, seed)
    stored = w.T.copy() if trans_b else w
    bias = np.linspace(-1, 1, n, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Gemm",
                ["x", "proj.weight", "proj.bias"],
                ["y"],
                name="proj/Gemm",
                transB=trans_b,
                alpha=alpha,
                beta=beta,
            )
        ],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [
            numpy_helper.from_array(stored, "proj.weight"),
            numpy_helper.from_array(bias, "proj.bias"),
        ],
    )
    return _finish(graph)


def left_matmul(m: int = 36, k: int = 40, *, seed: int = 5) -> onnx.ModelProto:
    """x[k, cols] -> MatMul(W, x) -> y[m, cols]: the weight on the left."""
    w = random_weight(m, k, seed)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["mix.weight", "x"], ["y"], name="mix/MatMul")],
        "left",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, "cols"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, "cols"])],
        [numpy_helper.from_array(w, "mix.weight")],
    )
    return _finish(graph)


def embedding_lm(
    vocab: int = 96, d: int = 32, *, tie: str = "transpose", seed: int = 7
) -> onnx.ModelProto:
    """ids -> Gather(E) -> LayerNorm -> MatMul W -> LM head tied to E.

    ``tie``: "transpose" (MatMul(h, Transpose(E))), "gemm" (Gemm(h2d, E, transB=1) on a 2-D
    view), or "none" (an untied head weight).
    """
    emb = random_weight(vocab, d, seed)
    w = random_weight(d, d, seed + 1)
    inits = [
        numpy_helper.from_array(emb, "embed.weight"),
        numpy_helper.from_array(w, "dense.weight"),
        numpy_helper.from_array(np.ones(d, np.float32), "ln.scale"),
        numpy_helper.from_array(np.zeros(d, np.float32), "ln.bias"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed.weight", "ids"], ["e"], name="embed/Gather", axis=0),
        helper.make_node(
            "LayerNormalization", ["e", "ln.scale", "ln.bias"], ["n"], name="ln", axis=-1
        ),
        helper.make_node("MatMul", ["n", "dense.weight"], ["h"], name="dense/MatMul"),
    ]
    if tie == "transpose":
        nodes += [
            helper.make_node(
                "Transpose", ["embed.weight"], ["embed_t"], name="head/T", perm=[1, 0]
            ),
            helper.make_node("MatMul", ["h", "embed_t"], ["logits"], name="head/MatMul"),
        ]
    elif tie == "gemm":
        inits.append(numpy_helper.from_array(np.array([-1, d], np.int64), "flat_shape"))
        nodes += [
            helper.make_node("Reshape", ["h", "flat_shape"], ["h2"], name="flatten"),
            helper.make_node(
                "Gemm", ["h2", "embed.weight"], ["logits"], name="head/Gemm", transB=1
            ),
        ]
    else:
        head = random_weight(d, vocab, seed + 2)
        inits.append(numpy_helper.from_array(head, "head.weight"))
        nodes.append(
            helper.make_node("MatMul", ["h", "head.weight"], ["logits"], name="head/MatMul")
        )
    out_shape: list[int | str] = ["batch", "seq", vocab] if tie != "gemm" else ["tokens", vocab]
    graph = helper.make_graph(
        nodes,
        "lm",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return _finish(graph)


def attention_block(d: int = 32, *, seed: int = 11) -> onnx.ModelProto:
    """A weight shared by two MatMuls plus an unrelated use: exercises 'shared in other ways'."""
    w = random_weight(d, d, seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "shared.weight"], ["a"], name="a/MatMul"),
            helper.make_node("MatMul", ["a", "shared.weight"], ["b"], name="b/MatMul"),
            helper.make_node("ReduceSum", ["shared.weight"], ["s"], name="sum", keepdims=0),
            helper.make_node("Add", ["b", "s"], ["y"], name="add"),
        ],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d])],
        [numpy_helper.from_array(w, "shared.weight")],
    )
    return _finish(graph)


def quantized_model(d: int = 32, *, seed: int = 13) -> onnx.ModelProto:
    """DequantizeLinear -> MatMul, MatMulInteger, an int weight, a 3-D weight and a small one."""
    rng = np.random.default_rng(seed)
    wq = rng.integers(-100, 100, size=(d, d), dtype=np.int8)
    wi = rng.integers(-100, 100, size=(d, d), dtype=np.int8)
    w3 = random_weight(d, d, seed + 1).reshape(1, d, d)
    small = random_weight(d, 4, seed + 2)
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["wq", "wq.scale"], ["wdq"], name="dq"),
            helper.make_node("MatMul", ["x", "wdq"], ["a"], name="q/MatMul"),
            helper.make_node("QuantizeLinear", ["a", "wq.scale"], ["aq"], name="qa"),
            helper.make_node("MatMulInteger", ["aq", "wi"], ["ai"], name="int/MatMulInteger"),
            helper.make_node("Cast", ["ai"], ["af"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["af", "w3"], ["b"], name="batched/MatMul"),
            helper.make_node("MatMul", ["b", "small.weight"], ["y"], name="small/MatMul"),
        ],
        "quant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "batch", 4])],
        [
            numpy_helper.from_array(wq, "wq"),
            numpy_helper.from_array(np.array(0.01, np.float32), "wq.scale"),
            numpy_helper.from_array(wi, "wi"),
            numpy_helper.from_array(w3, "w3"),
            numpy_helper.from_array(small, "small.weight"),
        ],
    )
    return _finish(graph)


def run_ort(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model (proto or path) in a single-threaded ORT CPU session with optimizations off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def write_model(model: onnx.ModelProto, path: Path) -> Path:
    """Save ``model`` at ``path``, creating its folder (a model file in a folder of its own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path
