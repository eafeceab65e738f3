"""Paired statistics for sequential calibration: what a weight sees now vs what it saw before.

Sequential, error-correcting calibration (issue 16) refits each weight to the inputs ``X̂`` it
gets in the *partially compressed* model while matching the original outputs ``X W``. That needs,
per weight input, ``Ĝ = X̂ᵀX̂`` and the cross-Gram ``C = X̂ᵀX``: both models run on the same
batch and their activations at the same tensor name are paired token by token (padding dropped
with the same mask). Like ``capture.collect_statistics`` the activations are reduced at once in
float64, so memory stays flat in the number of samples.

Each model is pruned to the nodes that feed the requested activations before ORT sees it (ORT
runs every node of a graph whatever outputs are fetched), so refitting the first blocks of a
decoder costs a fraction of a forward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from scipy.linalg.blas import dgemm

from factorlm._common.sessions import create_session
from factorlm._common.text import TextTokenizer, batch_feeds
from factorlm.calibration.capture import activation_rows
from factorlm.errors import ConfigError, ModelLoadError

__all__ = ["PairedGrams", "collect_paired_statistics", "prune_to_outputs"]

logger = logging.getLogger(__name__)

_MAX_PROTO = 2**31 - 1


@dataclass
class PairedGrams:
    """``X̂ᵀX̂`` and ``X̂ᵀX`` (float64, in × in) of one activation over ``tokens`` real tokens."""

    gram_hat: np.ndarray
    cross: np.ndarray
    tokens: int


def prune_to_outputs(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose only outputs are ``outputs`` and only nodes those need.

    Nodes are kept by walking the graph backwards from the outputs; graph inputs and
    initializers nothing reads any more are dropped. Nodes with subgraphs keep every name their
    subgraphs read (outer-scope references).
    """
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    graph = pruned.graph
    needed = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if not any(name in needed for name in node.output):
            continue
        kept.append(node)
        needed.update(name for name in node.input if name)
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs]:
                for inner in sub.node:
                    needed.update(name for name in inner.input if name)
    types: dict[str, onnx.ValueInfoProto] = {
        v.name: v for v in [*graph.value_info, *graph.output, *graph.input]
    }
    del graph.node[:]
    graph.node.extend(reversed(kept))
    keep_inits = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    keep_inputs = [value for value in graph.input if value.name in needed]
    del graph.input[:]
    graph.input.extend(keep_inputs)
    del graph.output[:]
    for name in outputs:
        elem = int(onnx.TensorProto.FLOAT)
        if name in types and types[name].type.tensor_type.elem_type:
            elem = int(types[name].type.tensor_type.elem_type)
        graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return pruned


def _session(model: onnx.ModelProto, outputs: Sequence[str], what: str) -> Any:
    pruned = prune_to_outputs(model, outputs)
    if pruned.ByteSize() >= _MAX_PROTO:
        raise ConfigError(
            f"sequential calibration needs {what} below 2 GB in one protobuf; this model is larger."
        )
    # Fusions would swallow the exposed MatMul inputs; basic optimizations keep them.
    return create_session(pruned.SerializeToString(), graph_optimization_level="basic", what=what)


def collect_paired_statistics(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    texts: Sequence[str],
    tokenizer: TextTokenizer,
    activations: Sequence[tuple[str, bool]],
    *,
    max_length: int,
    batch_size: int,
) -> dict[tuple[str, bool], PairedGrams]:
    """``Ĝ`` and ``C`` of each ``(activation, transpose)`` of ``compressed`` against ``original``.

    Both models must take the same inputs and name the activations alike (the factorizing
    passes keep the input names of the weights they have not rewritten yet).
    """
    if not activations:
        return {}
    names = list(dict.fromkeys(name for name, _ in activations))
    reference = _session(original, names, "the original model")
    candidate = _session(compressed, names, "the partially compressed model")
    missing = [n for n in names if n not in {o.name for o in candidate.get_outputs()}]
    if missing:
        raise ModelLoadError(f"The compressed model has no tensor {missing[0]!r} to calibrate.")
    result: dict[tuple[str, bool], PairedGrams] = {}
    wanted = {i.name for i in candidate.get_inputs()}  # pruning may drop inputs of late layers
    for end, mask, feeds in batch_feeds(
        reference.get_inputs(), tokenizer, texts, batch_size=batch_size, max_length=max_length
    ):
        del end
        ours = dict(zip(names, reference.run(names, feeds), strict=True))
        theirs = dict(
            zip(
                names,
                candidate.run(names, {k: v for k, v in feeds.items() if k in wanted}),
                strict=True,
            )
        )
        for key in dict.fromkeys(activations):
            name, transpose = key
            x = activation_rows(ours[name], mask, transpose).astype(np.float64)
            xh = activation_rows(theirs[name], mask, transpose).astype(np.float64)
            if key not in result:
                d = x.shape[1]
                result[key] = PairedGrams(
                    np.zeros((d, d), order="F"), np.zeros((d, d), order="F"), 0
                )
            entry = result[key]
            entry.gram_hat = dgemm(
                1.0, xh, xh, beta=1.0, c=entry.gram_hat, trans_a=1, overwrite_c=1
            )
            entry.cross = dgemm(1.0, xh, x, beta=1.0, c=entry.cross, trans_a=1, overwrite_c=1)
            entry.tokens += x.shape[0]
    for entry in result.values():
        entry.gram_hat = 0.5 * (entry.gram_hat + entry.gram_hat.T)
    return result
