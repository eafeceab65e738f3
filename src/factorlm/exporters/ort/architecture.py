"""Which transformer architecture a graph is, and its attention dimensions.

Why: ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, ...) only apply when
the optimizer is told the architecture, head count and hidden size. They come from the model
folder's ``config.json`` when there is one, else from the graph itself.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from factorlm.errors import ConfigError

__all__ = ["MODEL_TYPES", "detect_model_type", "infer_attention_dims", "read_config"]

logger = logging.getLogger(__name__)

#: Architectures the transformer optimizer knows, mapped to its ``model_type``. Llama-family
#: decoders use ``qwen3`` (ORT >= 1.22: the GPT-2 model class with rotary fusion): on optimum's
#: Llama export with past, ORT 1.32 then fuses SimplifiedLayerNormalization,
#: SkipSimplifiedLayerNormalization and RotaryEmbedding (two per layer); ``gpt2`` misses the
#: rotary fusion. Neither fuses MultiHeadAttention/GroupQueryAttention on that export (GQA comes
#: from onnxruntime-genai's model builder, not from ``optimize_model``).
MODEL_TYPES: dict[str, str] = {"bert": "bert", "gpt2": "gpt2", "llama": "qwen3"}

#: Hugging Face ``config.json`` model types per architecture family.
_HF_FAMILIES: dict[str, str] = {
    **dict.fromkeys(
        ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet", "camembert"), "bert"
    ),
    **dict.fromkeys(("gpt2",), "gpt2"),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "smollm"), "llama"),
}


def read_config(source: Path) -> dict[str, Any]:
    """The ``config.json`` next to ``source`` as a dict; {} when there is none."""
    path = source.parent / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}).") from exc
    return data if isinstance(data, dict) else {}


def detect_model_type(
    model: onnx.ModelProto, config: Mapping[str, Any] | None = None
) -> str | None:
    """``bert``, ``gpt2`` or ``llama`` from config.json's ``model_type``, else from the graph.

    The graph rule: decoders have past/present key-value inputs or outputs; RMS-norm or rotary
    ops make a decoder llama-like, LayerNorm makes it GPT-2-like; an ``input_ids`` encoder with
    LayerNorm and Softmax is BERT-like. Anything else returns None (plain graph optimization).
    """
    if config:
        hf_type = str(config.get("model_type", "")).lower()
        if hf_type in _HF_FAMILIES:
            return _HF_FAMILIES[hf_type]
    ops = {node.op_type for node in model.graph.node}
    in_names = [i.name for i in model.graph.input]
    out_names = [o.name for o in model.graph.output]
    decoder = any("past" in n for n in in_names) or any("present" in n for n in out_names)
    has_ln = bool(ops & {"LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization"})
    rms = bool(
        ops
        & {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization"}
    )
    rotary = bool(ops & {"RotaryEmbedding"}) or {"Sin", "Cos"} <= ops
    if decoder:
        if rms or rotary:
            return "llama"
        if has_ln:
            return "gpt2"
        return None
    if "input_ids" in in_names and has_ln and (ops & {"Softmax", "Attention"}):
        return "bert"
    return None


def _const_ints(model: onnx.ModelProto) -> dict[str, list[int]]:
    values: dict[str, list[int]] = {}
    for init in model.graph.initializer:
        if (
            init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
            and init.data_location != onnx.TensorProto.EXTERNAL
        ):
            arr = onnx.numpy_helper.to_array(init)
            if arr.size <= 8:
                values[init.name] = [int(v) for v in arr.ravel()]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in (
                    onnx.TensorProto.INT64,
                    onnx.TensorProto.INT32,
                ):
                    arr = onnx.numpy_helper.to_array(attr.t)
                    if arr.size <= 8:
                        values[node.output[0]] = [int(v) for v in arr.ravel()]
    return values


def infer_attention_dims(
    model: onnx.ModelProto, config: Mapping[str, Any] | None = None
) -> tuple[int, int]:
    """(num_heads, hidden_size) from config.json, else from the graph; 0 means unknown.

    From the graph: hidden size is the most common LayerNorm scale length; the head count is the
    most common ``h`` among Reshape target shapes ``[.., .., h, d]`` with ``h * d == hidden``.
    """
    config = config or {}
    heads = next(
        (int(config[k]) for k in ("num_attention_heads", "n_head", "num_heads") if k in config), 0
    )
    hidden = next((int(config[k]) for k in ("hidden_size", "n_embd", "d_model") if k in config), 0)
    if heads and hidden:
        return heads, hidden
    inits = {i.name: i for i in model.graph.initializer}
    if not hidden:
        sizes: Counter[int] = Counter()
        for node in model.graph.node:
            if (
                node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization")
                and len(node.input) > 1
            ):
                scale = inits.get(node.input[1])
                if scale is not None and len(scale.dims) == 1:
                    sizes[int(scale.dims[0])] += 1
        hidden = sizes.most_common(1)[0][0] if sizes else 0
    if not heads and hidden:
        consts = _const_ints(model)
        producers = {out: node for node in model.graph.node for out in node.output}
        candidates: Counter[int] = Counter()
        for node in model.graph.node:
            if node.op_type != "Reshape" or len(node.input) < 2:
                continue
            shape = consts.get(node.input[1])
            producer = producers.get(node.input[1])
            if shape is None and producer is not None and producer.op_type == "Concat":
                parts = []
                for name in producer.input:
                    src = producers.get(name)
                    if name in consts and len(consts[name]) == 1:
                        parts.append(consts[name][0])
                    elif src is not None and src.op_type == "Unsqueeze" and src.input[0] in consts:
                        parts.append(consts[src.input[0]][0])
                    else:
                        parts.append(-1)
                shape = parts
            if shape is not None and len(shape) == 4 and shape[2] > 0 < shape[3]:
                candidates.update([shape[2]] if shape[2] * shape[3] == hidden else [])
        heads = candidates.most_common(1)[0][0] if candidates else 0
    return heads, hidden
