"""Weights read from disk on demand and factors spilled to disk, so compress runs in bounded memory.

Why: onnx_ir maps a whole external-data file per tensor and keeps the mapping (and every page
it touched) until the tensor is released, so reading each weight once during planning leaves
the whole model resident. Here every external weight becomes a :class:`StreamedTensor` that maps
only its own bytes on each read and keeps nothing, and every factor a rewrite creates is written
at once to a spill file (:class:`FactorSpill`) and replaced by a streamed view of it. Saving then
copies both kinds file-to-file (``copy_file_range``), so the process holds about one weight (and
its float64 work arrays) at a time, not a multiple of the model.

:class:`WeightRef` is the plain, picklable address of a weight (path, offset, length, dtype,
shape) that a Ray task reads its weight from, so no worker holds the whole model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx_ir as ir

__all__ = [
    "FactorSpill",
    "StreamedTensor",
    "WeightRef",
    "WeightSource",
    "inline_tensor_attributes",
    "stream_model",
    "weight_ref",
]

logger = logging.getLogger(__name__)

#: Data types whose bytes numpy reads as they are (no 2/4/6-bit packing).
_PACKED_BITS = (2, 4, 6)


@dataclass(frozen=True)
class WeightRef:
    """Where one tensor's bytes live: enough to read it anywhere the file is visible."""

    path: str
    offset: int
    length: int
    dtype: str  # numpy dtype string, little-endian (ONNX external data byte order)
    shape: tuple[int, ...]

    def read(self) -> np.ndarray:
        """The tensor, memory-mapped from its own bytes only; unmapped when the array is dropped."""
        dtype = np.dtype(self.dtype)
        if self.length == 0 or 0 in self.shape:
            return np.empty(self.shape, dtype=dtype)
        mapped = np.memmap(self.path, dtype=dtype, mode="r", offset=self.offset, shape=self.shape)
        return np.asarray(mapped)


@dataclass(frozen=True)
class WeightSource:
    """A core matrix as parts on disk (or in memory), for a worker to assemble.

    ``parts`` are the stored tensors of the weight (several for a joint Q/K/V weight, joined
    along the output axis); ``transposed`` when the core reads the stored tensor transposed.
    """

    parts: tuple[WeightRef | np.ndarray, ...]
    transposed: bool = False

    def matrix(self) -> np.ndarray:
        """The weight in the core's ``(in, out)`` orientation, as ``Candidate.matrix`` gives it."""
        arrays = [p.read() if isinstance(p, WeightRef) else p for p in self.parts]
        stored = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=1)
        return stored.T if self.transposed else stored


def _numpy_dtype(dtype: ir.DataType) -> np.dtype[Any]:
    return np.dtype(dtype.numpy()).newbyteorder("<")


class StreamedTensor(ir.ExternalTensor):
    """An external tensor that maps only its own bytes on every read and caches nothing.

    Drop-in for ``ir.ExternalTensor`` (serialization, ``tofile`` file-to-file copy on save are
    inherited); ``numpy()`` returns a fresh read-only mapping, so memory is held only while the
    caller holds the array.
    """

    __slots__ = ()

    def ref(self) -> WeightRef:
        """The address of this tensor's bytes."""
        return _address(self)

    def numpy(self) -> np.ndarray:
        self._check_validity()
        return self.ref().read()

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def tobytes(self) -> bytes:
        return self.numpy().tobytes()


def _address(tensor: ir.ExternalTensor) -> WeightRef:
    """File, offset, length, dtype and shape of an external tensor's bytes."""
    return WeightRef(
        os.path.abspath(tensor.path),
        int(tensor.offset or 0),
        int(tensor.length if tensor.length is not None else tensor.nbytes),
        _numpy_dtype(tensor.dtype).str,
        tuple(int(d) for d in tensor.shape.numpy()),
    )


def _streamable(tensor: object) -> bool:
    return type(tensor) is ir.ExternalTensor and tensor.dtype.bitwidth not in _PACKED_BITS


def stream_model(model: ir.Model) -> int:
    """Make every external initializer a :class:`StreamedTensor` (in place); return how many.

    External tensor *attributes* (``Constant`` values that exporters of models above 2 GB put
    in the data file too) are read into memory instead: onnx_ir saves an attribute where it
    was, so the output would point at the input's data file by a relative path (the checker
    refuses it). They are small constants, not weights.
    """
    inlined = inline_tensor_attributes(model)
    if inlined:
        logger.debug("Read %d external tensor attributes into memory", inlined)
    count = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if not _streamable(tensor):
                continue
            assert isinstance(tensor, ir.ExternalTensor)
            value.const_value = StreamedTensor(
                tensor.location,
                tensor.offset,
                tensor.length,
                tensor.dtype,
                shape=tensor.shape,
                name=tensor.name,
                doc_string=tensor.doc_string,
                base_dir=tensor.base_dir,
            )
            tensor.release()
            count += 1
    logger.debug("Streaming %d external initializers", count)
    return count


def inline_tensor_attributes(model: ir.Model) -> int:
    """Replace every external tensor attribute of every node (subgraphs too) by an in-memory
    copy, in place; return how many were replaced."""
    count = 0
    for graph in model.graphs():
        for node in graph:
            for name, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and isinstance(
                    attr.value, ir.ExternalTensor
                ):
                    node.attributes[name] = ir.AttrTensor(name, _in_memory(attr.value))
                    count += 1
                elif attr.type == ir.AttributeType.TENSORS and any(
                    isinstance(t, ir.ExternalTensor) for t in attr.value
                ):
                    tensors = [
                        _in_memory(t) if isinstance(t, ir.ExternalTensor) else t for t in attr.value
                    ]
                    node.attributes[name] = ir.AttrTensors(name, tensors)
                    count += 1
    return count


def _in_memory(tensor: ir.ExternalTensor) -> ir.Tensor:
    """An in-memory copy of an external tensor (its bytes read once, the mapping released)."""
    copy = ir.Tensor(
        np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string
    )
    tensor.release()
    return copy


def weight_ref(tensor: object) -> WeightRef | None:
    """The on-disk address of a streamed or external tensor; None for in-memory tensors."""
    if isinstance(tensor, StreamedTensor):
        return tensor.ref()
    if _streamable(tensor):
        assert isinstance(tensor, ir.ExternalTensor)
        return _address(tensor)
    return None


class FactorSpill:
    """Appends tensors to one file in ``folder`` and hands back streamed views of them.

    The caller owns ``folder`` (a staged folder removed after the model is saved) and must keep
    the file until the model that refers to it has been written.
    """

    #: Offsets are aligned so every spilled array starts on a cache line.
    ALIGN = 64

    def __init__(self, folder: str | os.PathLike[str], name: str = "factors.bin") -> None:
        self.folder = Path(folder)
        self.name = name
        self._file: BinaryIO | None = open(self.folder / name, "wb")  # noqa: SIM115
        self._offset = 0
        self.bytes_written = 0

    def store(self, tensor: ir.TensorProtocol) -> StreamedTensor:
        """Write ``tensor``'s bytes and return a streamed tensor that reads them back."""
        if self._file is None:
            raise ValueError("the factor spill file is closed")
        array = np.ascontiguousarray(tensor.numpy()).astype(_numpy_dtype(tensor.dtype), copy=False)
        start = -(-self._offset // self.ALIGN) * self.ALIGN
        self._file.seek(start)
        self._file.write(array.reshape(-1).view(np.uint8).data)
        self._file.flush()
        self._offset = start + array.nbytes
        self.bytes_written += array.nbytes
        return StreamedTensor(
            self.name,
            start,
            int(array.nbytes),
            tensor.dtype,
            shape=ir.Shape(array.shape),
            name=tensor.name or "",
            base_dir=str(self.folder),
        )

    def spill(self, model: ir.Model, names: Iterable[str]) -> int:
        """Replace the in-memory initializers ``names`` by streamed views of their spilled bytes."""
        count = 0
        for name in names:
            value = model.graph.initializers.get(name)
            tensor = None if value is None else value.const_value
            if value is None or tensor is None or isinstance(tensor, ir.ExternalTensor):
                continue
            value.const_value = self.store(tensor)
            count += 1
        return count

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FactorSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
