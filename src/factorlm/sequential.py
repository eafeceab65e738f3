"""Sequential, error-correcting refit of a plan: block by block, on the inputs each weight will see.

A plan's ranks come from the original model's statistics. Fitting every weight to the original
inputs ``X`` lets errors pile up through the layers: the weights of layer 20 really receive the
``X̂`` of a model whose layers 0-19 are already approximate. ``refit_sequentially`` walks the
planned weights in graph order, in ``blocks`` contiguous groups. Before each group it runs the
original and the partially compressed model side by side on the calibration texts
(``calibration.paired``) and refits the group's weights with the closed form of
``decompose.corrected``: the rank-r ``M`` minimising ``‖X W − X̂ M‖`` is the whitened truncation
of ``M* = Ĝ⁻¹ C W`` under ``Ĝ``. The first group sees the original inputs, so it needs no pass.

The caller rewrites each weight as soon as its factors are yielded, so when the generator is
asked for the first weight of a group, every earlier weight is already in the graph it
serializes. The numbers all come from ``factorlm.decompose``; this module only orders and feeds.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from factorlm._common.text import TextTokenizer
from factorlm.calibration.paired import collect_paired_statistics
from factorlm.calibration.targets import Target
from factorlm.decompose import corrected_weight, prepared_lowrank
from factorlm.errors import ConfigError

__all__ = ["block_order", "refit_sequentially"]

logger = logging.getLogger(__name__)


def block_order(
    names: Sequence[str],
    activation_of: Mapping[str, tuple[str, bool]],
    position: Mapping[str, int],
    blocks: int,
) -> list[list[str]]:
    """The planned weights in graph order, cut into at most ``blocks`` contiguous groups.

    Weights that read the same activation (Q, K and V) always land in the same group, so the
    group boundaries fall between layers' inputs, never inside one.
    """
    ordered = sorted(names, key=lambda n: (position[n], n))
    runs: list[list[str]] = []
    for name in ordered:
        if runs and activation_of[runs[-1][-1]] == activation_of[name]:
            runs[-1].append(name)
        else:
            runs.append([name])
    count = max(1, min(blocks, len(runs)))
    bounds = np.linspace(0, len(runs), count + 1).round().astype(int)
    return [[n for run in runs[a:b] for n in run] for a, b in itertools.pairwise(bounds)]


def refit_sequentially(
    model: ir.Model,
    original: onnx.ModelProto,
    groups: Sequence[Sequence[str]],
    ranks: Mapping[str, int],
    matrix_of: Callable[[str], np.ndarray],
    activation_of: Mapping[str, tuple[str, bool]],
    *,
    gram_of: Callable[[str], np.ndarray],
    output_weight_of: Callable[[str], np.ndarray | None],
    texts: Sequence[str],
    tokenizer: TextTokenizer,
    max_length: int,
    batch_size: int,
    ridge: float = 0.0,
) -> Iterator[tuple[str, Any]]:
    """``(name, LowRank)`` for every weight of ``groups`` in order, refit on paired statistics.

    ``model`` is the graph being rewritten (read between groups, never changed here);
    ``original`` the input model's protobuf. ``gram_of(name)`` is the original ``XᵀX`` used for
    the first group.
    """
    for index, group in enumerate(groups):
        if index == 0:
            for name in group:
                yield name, prepared_lowrank(
                    matrix_of(name), "whiten", ranks[name], gram=gram_of(name),
                    output_weight=output_weight_of(name),
                )  # fmt: skip
            continue
        tick = time.perf_counter()
        current = _with_weights(model)
        paired = collect_paired_statistics(
            original,
            current,
            texts,
            tokenizer,
            [activation_of[n] for n in group],
            max_length=max_length,
            batch_size=batch_size,
        )
        del current
        logger.info(
            "Sequential block %d/%d: %d weights, paired statistics in %.1f s",
            index + 1, len(groups), len(group), time.perf_counter() - tick,
        )  # fmt: skip
        for name in group:
            grams = paired[activation_of[name]]
            if grams.tokens == 0:
                raise ConfigError(
                    "sequential calibration saw no tokens; check the calibration data."
                )
            weight = matrix_of(name)
            target = corrected_weight(weight, grams.gram_hat, grams.cross, ridge=ridge)
            target = target.astype(weight.dtype, copy=False)  # factors in the weight's dtype
            yield name, prepared_lowrank(
                target, "whiten", ranks[name], gram=grams.gram_hat,
                output_weight=output_weight_of(name),
            )  # fmt: skip
        del paired


def _with_weights(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a protobuf with the weights it still reads from external data read in.

    Why: the paired capture hands ONNX Runtime the protobuf's bytes, and a model loaded from
    bytes cannot resolve an external-data location relative to the input model's folder.
    """
    from onnx.external_data_helper import load_external_data_for_tensor

    folders = {
        name: value.const_value.base_dir
        for name, value in model.graph.initializers.items()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    proto = ir.serde.serialize_model(model)
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name in folders:
            load_external_data_for_tensor(tensor, str(folders[tensor.name]))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return proto


def activations_for(
    names: Sequence[str], members: Mapping[str, Sequence[str]], targets: Sequence[Target]
) -> tuple[dict[str, tuple[str, bool]], dict[str, int]]:
    """Each planned weight's ``(activation, transpose)`` and its position in graph order.

    A joint Q/K/V candidate reads its first member's input.
    """
    by_weight = {t.weight: (i, (t.activation, t.transpose)) for i, t in enumerate(targets)}
    activation: dict[str, tuple[str, bool]] = {}
    position: dict[str, int] = {}
    for name in names:
        first = (members.get(name) or [name])[0]
        if first not in by_weight:
            raise ConfigError(
                f"weight {name!r} is not a MatMul/Gemm input the sequential refit can calibrate; "
                "restrict --include to linear weights."
            )
        position[name], activation[name] = by_weight[first]
    return activation, position
