"""Export a trained student with its factorized structure, and tag the factors for the passes.

The student is exported from memory with ``optimum.exporters.onnx.onnx_export_from_model`` (a
folder re-loaded by ``from_pretrained`` would rebuild dense layers), validated against the same
in-memory model with ``factorlm.exporters.hf.validate``, and its factor initializers are recorded
in the model metadata ``factorlm.factors`` (``{factor initializer: original initializer}``), so
``factorlm compress`` leaves already-factorized weights alone. A joint Q/K/V's shared ``x @ L``
is then merged into one MatMul (``passes.MergeSharedMatMulsPass``; the TorchScript exporter
usually writes it once already), the form ``compress(joint_qkv=True)`` writes and ONNX Runtime
builds fuse into Attention.

Why factors are found by sorted values: the TorchScript exporter constant-folds layout changes
(``weight.t()``, ``a.transpose(1, 2)``) into new initializers, so a factor appears transposed or
permuted. A permutation keeps the multiset of values, so ``(size, sha1(sorted values))`` finds
it whatever the layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from factorlm.errors import ModelLoadError
from factorlm.passes.analysis import FACTOR_METADATA_KEY

__all__ = ["export_student", "merge_shared_factors", "share_transposed_factors", "tag_factors"]

logger = logging.getLogger(__name__)


def _fingerprint(array: np.ndarray) -> tuple[int, bytes]:
    flat = np.sort(np.asarray(array, dtype=np.float32).ravel())
    return flat.size, hashlib.sha1(flat.tobytes()).digest()


def _data_location(onnx_path: Path) -> str | None:
    """The external-data file the model's weights live in (relative), or None when inline."""
    from factorlm._common.outputs import external_data_files

    files = external_data_files(onnx_path)
    return str(files[0].relative_to(onnx_path.parent)) if files else None


def _save_back(model: Any, onnx_path: Path) -> None:
    """Write a fully loaded ``model`` over ``onnx_path`` in the same layout as it was read.

    Why: the student's export keeps its weights in external data above 2 GB (optimum), where an
    inline save fails; a model read with external data is written back with it, to the same file
    name (removed first: onnx appends to an existing data file, and its bytes are in memory).
    """
    import onnx

    location = _data_location(onnx_path)
    if location is None:
        onnx.save(model, str(onnx_path))
        return
    (onnx_path.parent / location).unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(onnx_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
    )


def tag_factors(onnx_path: Path, factors: Mapping[str, list[np.ndarray]]) -> dict[str, str]:
    """Record ``{initializer: original}`` for every factor of ``factors`` (original -> tensors).

    Returns the recorded mapping; the file is rewritten in place (callers write to a staging
    folder). Factors not found as initializers are logged.
    """
    import onnx
    from onnx import numpy_helper

    wanted: dict[tuple[int, bytes], str] = {}
    for original, tensors in factors.items():
        for tensor in tensors:
            wanted.setdefault(_fingerprint(tensor), original)
    model = onnx.load(str(onnx_path))
    tags: dict[str, str] = {}
    found: set[tuple[int, bytes]] = set()
    for init in model.graph.initializer:
        if len(init.dims) < 2:
            continue
        key = _fingerprint(numpy_helper.to_array(init))
        if key in wanted:
            tags[init.name] = wanted[key]
            found.add(key)
    if len(found) < len(wanted):
        logger.info("%d factor tensors have no initializer of their own", len(wanted) - len(found))
    props = {p.key: p.value for p in model.metadata_props}
    merged = json.loads(props.get(FACTOR_METADATA_KEY, "{}") or "{}")
    merged.update(tags)
    del model.metadata_props[:]
    for key, value in {**props, FACTOR_METADATA_KEY: json.dumps(merged, sort_keys=True)}.items():
        model.metadata_props.add(key=key, value=value)
    _save_back(model, onnx_path)
    logger.info("Tagged %d factor initializers in %s", len(tags), onnx_path)
    return tags


def share_transposed_factors(onnx_path: Path, factors: Mapping[str, list[np.ndarray]]) -> int:
    """Replace an initializer that is the transpose of a factor by ``Transpose(factor)``, in place.

    Why: a tied LM head reads the embedding's factor ``L`` as ``Lᵀ``, and the TorchScript exporter
    folds that into a second (vocab x r) initializer; the factorized graph stores ``L`` once and
    reads it through a Transpose, as the original export does for the tied dense head (ORT folds
    it at session start, and the int4 build folds it for the quantizer). How many were replaced.
    """
    import onnx
    from onnx import helper, numpy_helper

    shapes: dict[tuple[int, bytes], set[tuple[int, ...]]] = {}
    for tensors in factors.values():
        for tensor in tensors:
            if tensor.ndim == 2:
                shapes.setdefault(_fingerprint(tensor), set()).add(tuple(tensor.shape))
    model = onnx.load(str(onnx_path))
    by_key: dict[tuple[int, bytes], list[tuple[onnx.TensorProto, np.ndarray]]] = {}
    for init in model.graph.initializer:
        if len(init.dims) != 2:
            continue
        key = _fingerprint(numpy_helper.to_array(init))
        if key in shapes:
            by_key.setdefault(key, []).append((init, numpy_helper.to_array(init)))
    copies: list[tuple[onnx.TensorProto, str]] = []
    for key, group in by_key.items():
        # Keep the tensor in the module's own layout; its transposed twin becomes a Transpose.
        group.sort(key=lambda item: tuple(item[0].dims) not in shapes[key])
        kept = group[0]
        for init, array in group[1:]:
            if array.shape == kept[1].shape[::-1] and np.array_equal(array, kept[1].T):
                copies.append((init, kept[0].name))
    if not copies:
        return 0
    for position, (init, source) in enumerate(copies):
        node = helper.make_node(
            "Transpose", [source], [init.name], name=f"{init.name}/factorlm_shared", perm=[1, 0]
        )
        model.graph.node.insert(position, node)
        model.graph.initializer.remove(init)
    _save_back(model, onnx_path)
    logger.info("Replaced %d transposed factor copies by Transpose nodes", len(copies))
    return len(copies)


def merge_shared_factors(onnx_path: Path) -> int:
    """Merge duplicate ``MatMul(x, factor)`` nodes of the tagged model in place; how many went."""
    import onnx_ir as ir

    from factorlm.passes.shared import MergeSharedMatMulsPass

    model = ir.load(str(onnx_path))
    before = sum(1 for _ in model.graph)
    result = MergeSharedMatMulsPass()(model)
    if not result.modified:
        return 0
    location = _data_location(onnx_path)
    # onnx_ir writes external data through a temporary file, so the old one stays readable
    ir.save(result.model, str(onnx_path), external_data=location)
    return before - sum(1 for _ in result.model.graph)


def export_student(
    model: Any,
    model_dir: Path,
    stage: Path,
    task: str,
    factors: Mapping[str, list[np.ndarray]],
    *,
    rtol: float = 1e-3,
) -> dict[str, Any]:
    """Export ``model`` into ``stage/model.onnx`` (+ tokenizer/config), validate and tag it."""
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    from factorlm._common.files import copy_sidecars
    from factorlm.exporters.hf import validate

    model.eval()
    stage.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        onnx_export_from_model(model, output=stage, task=task, do_validation=False, device="cpu")
    onnx_path = stage / "model.onnx"
    if not onnx_path.is_file():
        raise ModelLoadError(f"optimum wrote no model.onnx for the recovered {model_dir}.")
    copy_sidecars(Path(model_dir) / "config.json", stage)
    checks = validate(onnx_path, model_dir, task, torch_model=model)
    worst = max(checks, key=lambda c: c.relative)
    if worst.relative > rtol:
        raise ModelLoadError(
            f"The ONNX export of the recovered model differs from PyTorch on output {worst.name} "
            f"by {worst.relative:.2g} of its scale (tolerance {rtol:g})."
        )
    shared = share_transposed_factors(onnx_path, factors)
    tags = tag_factors(onnx_path, factors)
    merged = merge_shared_factors(onnx_path)
    return {
        "max_relative_diff": worst.relative,
        "shared_transposed_factors": shared,
        "tagged_factors": len(tags),
        "merged_matmuls": merged,
    }
