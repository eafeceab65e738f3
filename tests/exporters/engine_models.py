"""Models and helpers for the engine tests: an MLP, a factorized MLP, BERT feeds, cosine.

Self-contained (no import of ``tests/models.py``) so the engine tests import the same way
whether or not ``tests`` is a package.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB = 96
SEQ = 16


def random_weight(rows: int, cols: int, seed: int, *, decay: float = 0.0) -> np.ndarray:
    """A float32 matrix; with ``decay`` > 0 its singular values fall off like exp(-decay*i)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols))
    if decay > 0:
        u, _, vt = np.linalg.svd(w, full_matrices=False)
        w = (u * np.exp(-decay * np.arange(min(rows, cols)))) @ vt
    return (w / np.sqrt(rows)).astype(np.float32)


def mlp(d_in: int = 32, hidden: int = 64, d_out: int = 24, *, seed: int = 0) -> onnx.ModelProto:
    """x[batch, seq, d_in] -> MatMul W1 -> Add b1 -> Relu -> MatMul W2 -> Add b2 -> y."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"], name="fc1/MatMul"),
            helper.make_node("Add", ["h0", "fc1.bias"], ["h1"], name="fc1/Add"),
            helper.make_node("Relu", ["h1"], ["h2"], name="act"),
            helper.make_node("MatMul", ["h2", "fc2.weight"], ["h3"], name="fc2/MatMul"),
            helper.make_node("Add", ["h3", "fc2.bias"], ["y"], name="fc2/Add"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d_out])],
        [
            numpy_helper.from_array(random_weight(d_in, hidden, seed), "fc1.weight"),
            numpy_helper.from_array(np.linspace(-0.1, 0.1, hidden, dtype=np.float32), "fc1.bias"),
            numpy_helper.from_array(random_weight(hidden, d_out, seed + 1), "fc2.weight"),
            numpy_helper.from_array(np.linspace(0.1, -0.1, d_out, dtype=np.float32), "fc2.bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def run_ort(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Reference outputs: single-threaded ORT CPU session with every optimization off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def bert_feeds(batch: int = 2, seq: int = SEQ, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids with a padded tail in the second row, as a tokenizer would produce."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), dtype=np.int64)
    if batch > 1:
        mask[1, seq // 2 :] = 0
    return {
        "input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


def factorized_mlp(
    d_in: int = 32, hidden: int = 64, d_out: int = 24, rank: int = 8
) -> onnx.ModelProto:
    """x -> (x @ L1) @ R1 + b1 -> Relu -> (h @ L2) @ R2 + b2: factors named like factorlm's."""
    nodes = []
    inits = []
    prev = "x"
    for i, (m, n) in enumerate(((d_in, hidden), (hidden, d_out)), start=1):
        w = random_weight(m, n, seed=i, decay=0.2)
        u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        left = (u[:, :rank] * np.sqrt(s[:rank])).astype(np.float32)
        right = (np.sqrt(s[:rank])[:, None] * vt[:rank]).astype(np.float32)
        base = f"fc{i}.weight"
        inits += [
            numpy_helper.from_array(left, f"{base}.factorlm_left"),
            numpy_helper.from_array(right, f"{base}.factorlm_right"),
            numpy_helper.from_array(np.linspace(-0.1, 0.1, n, dtype=np.float32), f"fc{i}.bias"),
        ]
        nodes += [
            helper.make_node(
                "MatMul", [prev, f"{base}.factorlm_left"], [f"l{i}"], name=f"fc{i}/factorlm_lowrank"
            ),
            helper.make_node(
                "MatMul", [f"l{i}", f"{base}.factorlm_right"], [f"r{i}"], name=f"fc{i}/MatMul"
            ),
            helper.make_node("Add", [f"r{i}", f"fc{i}.bias"], [f"a{i}"], name=f"fc{i}/Add"),
        ]
        prev = f"a{i}"
        if i == 1:
            nodes.append(helper.make_node("Relu", [prev], ["h"], name="act"))
            prev = "h"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "factorized_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d_out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flattened outputs, in float64."""
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
