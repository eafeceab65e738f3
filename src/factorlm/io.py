"""Loading and saving ONNX models safely.

Loading refuses, with one sentence each, every input that would otherwise surface as a protobuf
traceback or, worse, read a file outside the model's folder: a missing path, a file that is not
ONNX, a truncated protobuf, missing external data, and external data whose location escapes the
model's folder. Saving is atomic (temporary names in the destination folder, then rename) and
every output is checked with the full ONNX checker and strict shape inference before it appears.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from factorlm._common.outputs import clean_stale, make_stage, remove_stage
from factorlm._common.userfiles import check_onnx_model
from factorlm.errors import ModelLoadError

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "check_model_file",
    "load_model",
    "model_data_bytes",
    "save_model",
]

logger = logging.getLogger(__name__)

#: Protobuf cannot serialize a message above 2 GiB; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a graph: initializers and attribute tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse external data that is missing, too short, or located outside the model's folder."""
    folder = path.parent.resolve()
    for tensor in _graph_tensors(proto.graph):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location
        if not location or os.path.isabs(location):
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} points to external data {location!r}, "
                "which is not a relative path inside the model's folder."
            )
        target = (folder / location).resolve()
        if target != folder and folder not in target.parents:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} points to external data {location!r}, "
                "outside the model's folder; refusing to read it."
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing."
            )
        offset = int(info.offset or 0)
        length = info.length
        size = target.stat().st_size
        if length is not None and offset + int(length) > size:
            raise ModelLoadError(
                f"{path}: external data file {location!r} is truncated: tensor "
                f"{tensor.name!r} needs bytes {offset}..{offset + int(length)} of {size}."
            )


def _read_proto(path: Path) -> onnx.ModelProto:
    """Parse the protobuf without external data, naming the failure in one sentence."""
    with open(path, "rb") as handle:
        head = handle.read(1)
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        # ModelProto starts with ir_version (field 1, varint): tag byte 0x08.
        if head == b"\x08":
            raise ModelLoadError(
                f"{path} is a truncated or corrupt ONNX protobuf ({exc})."
            ) from None
        raise ModelLoadError(f"{path} is not an ONNX file.") from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise ModelLoadError(f"{path} is not an ONNX file (no IR version, graph or opset).")
    return proto


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX model into onnx_ir, refusing unsafe or malformed inputs with ModelLoadError.

    External data is memory-mapped lazily by onnx_ir; its presence, length and location are
    checked here first so a later read cannot fail or escape the model's folder.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist.")
    if path.is_dir():
        candidate = path / "model.onnx"
        if not candidate.is_file():
            raise ModelLoadError(f"{path} is a folder without a model.onnx file.")
        path = candidate
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty, not an ONNX file.")
    proto = _read_proto(path)
    _check_external_data(proto, path)
    check_onnx_model(proto, path)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    logger.info("Loaded %s (%d nodes)", path, len(model.graph))
    return model


def model_data_bytes(model: ir.Model) -> int:
    """Bytes of all initializers: what decides whether external data is needed."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += int(tensor.nbytes)
    return total


def save_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> list[Path]:
    """Write ``model`` atomically to ``path`` and return the files written.

    With ``external_data=None`` weights go to ``<name>.data`` next to the model only when the
    model is above protobuf's 2 GB limit. Both files are written under temporary names in the
    destination folder, checked (full checker + strict shape inference), then renamed.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = model_data_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    clean_stale(folder, path.name)  # the stage of a killed earlier save
    staging: Path | None = None
    try:
        staging = make_stage(folder, path.name, "save")
        staged = staging / path.name
        if external_data:
            ir.save(model, staged, external_data=data_name, size_threshold_bytes=1024)
        else:
            # Tensors still memory-mapped from an input's data file must be embedded, or the
            # output would point at the input's external data by a relative path.
            ir.external_data.load_to_model(model)
            ir.save(model, staged)
        check_model_file(staged)
        written = [path]
        staged_data = staging / data_name
        if staged_data.exists():
            os.replace(staged_data, folder / data_name)
            written.append(folder / data_name)
        os.replace(staged, path)
    finally:
        remove_stage(staging)
    logger.info("Saved %s", ", ".join(str(p) for p in written))
    return written


def check_model_file(path: Path) -> None:
    """Run the full ONNX checker (which includes strict shape inference) on a saved file."""
    onnx.checker.check_model(str(path), full_check=True)
