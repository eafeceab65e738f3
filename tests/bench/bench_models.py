"""Tiny ONNX models and a word-level tokenizer for the benchmark tests, built in code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB = 40
DIM = 16
WORDS = [f"w{i}" for i in range(VOCAB - 2)]  # ids 2.. ; 0 = [PAD], 1 = [UNK]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def encoder_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((VOCAB, DIM)).astype(np.float32),
        rng.standard_normal((DIM, DIM)).astype(np.float32) / 4,
    )


def encoder(
    path: Path,
    *,
    seed: int = 0,
    weight_noise: float = 0.0,
    heavy: int = 0,
    with_token_types: bool = False,
    output_name: str = "last_hidden_state",
) -> Path:
    """hidden = (E[ids] @ W) * mask; ``heavy`` adds that many 512x512 MatMuls whose result is x0.

    The heavy branch depends on the input (so no constant folding removes it) and is multiplied by
    zero before being added, so outputs are bit-identical to the light model but latency is not.
    """
    table, weight = encoder_weights(seed)
    if weight_noise:
        weight = (
            weight
            + np.random.default_rng(seed + 100).standard_normal(weight.shape).astype(np.float32)
            * weight_noise
        )
    inits = [numpy_helper.from_array(table, "embed"), numpy_helper.from_array(weight, "W")]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "W"], ["hw"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis_last"], ["mask3"]),
        helper.make_node("Mul", ["hw", "mask3"], ["out0"]),
    ]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axis_last"))
    last = "out0"
    if heavy:
        rng = np.random.default_rng(7)
        inits.append(
            numpy_helper.from_array(rng.standard_normal((DIM, 512)).astype(np.float32) / 4, "up")
        )
        nodes.append(helper.make_node("MatMul", ["h", "up"], ["heavy0"]))
        for k in range(heavy):
            inits.append(
                numpy_helper.from_array(
                    rng.standard_normal((512, 512)).astype(np.float32) / 23, f"sq{k}"
                )
            )
            nodes.append(helper.make_node("MatMul", [f"heavy{k}", f"sq{k}"], [f"heavy{k + 1}"]))
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
        nodes += [
            helper.make_node("ReduceMean", [f"heavy{heavy}"], ["heavy_mean"], keepdims=0),
            helper.make_node("Mul", ["heavy_mean", "zero"], ["heavy_zero"]),
            helper.make_node("Add", [last, "heavy_zero"], ["out1"]),
        ]
        last = "out1"
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    if with_token_types:
        inputs.append(
            helper.make_tensor_value_info(
                "token_type_ids", TensorProto.INT64, ["batch", "sequence"]
            )
        )
    nodes.append(helper.make_node("Identity", [last], [output_name]))
    outputs = [
        helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", "sequence", DIM])
    ]
    return _save(helper.make_graph(nodes, "encoder", inputs, outputs, inits), path)


def bigram_weights(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((VOCAB, DIM)).astype(np.float32),
        rng.standard_normal((DIM, VOCAB)).astype(np.float32),
    )


def bigram_lm(path: Path, *, with_past: bool, seed: int = 3) -> Path:
    """logits[t] = E[ids[t]] @ U: a causal LM whose next-token law depends on the current token.

    With ``with_past`` it has Hugging Face-style ``past_key_values.0.key/value`` inputs of shape
    (batch, 2, past, 8) and ``present.0.*`` outputs (past concatenated with this step's keys).
    """
    table, unembed = bigram_weights(seed)
    inits = [
        numpy_helper.from_array(table, "embed"),
        numpy_helper.from_array(unembed, "U"),
        numpy_helper.from_array(np.array([0, 0, 2, 8], np.int64), "kv_shape"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "U"], ["logits"]),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])
    ]
    if with_past:
        nodes += [
            helper.make_node("Reshape", ["h", "kv_shape"], ["k4"]),
            helper.make_node("Transpose", ["k4"], ["k"], perm=[0, 2, 1, 3]),
        ]
        for kind in ("key", "value"):
            name = f"past_key_values.0.{kind}"
            inputs.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 2, "past", 8])
            )
            nodes.append(helper.make_node("Concat", [name, "k"], [f"present.0.{kind}"], axis=2))
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.0.{kind}", TensorProto.FLOAT, ["batch", 2, "total", 8]
                )
            )
    return _save(helper.make_graph(nodes, "bigram", inputs, outputs, inits), path)


def save_tokenizer(folder: Path) -> Path:
    """A whitespace word-level tokenizer over ``WORDS`` (ids 2..), saved like an HF export."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder


def labelled_texts(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Two classes with disjoint vocabularies: a probe separates them perfectly."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        label = "pos" if i % 2 == 0 else "neg"
        pool = WORDS[:10] if label == "pos" else WORDS[10:20]
        length = int(rng.integers(3, 9))
        rows.append({"text": " ".join(rng.choice(pool, size=length)), "label": label})
    return rows
