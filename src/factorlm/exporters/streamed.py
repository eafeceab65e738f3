"""Make optimum's ONNX export write the weights to one external-data file, tensor by tensor.

Why: torch's TorchScript exporter (what optimum calls) builds the whole ModelProto, its
serialized string and a Python copy of it in one C++ call while the PyTorch model is loaded;
on BERT-base that is +1.2 GB over the model, the largest peak of a ``factorlm run``, and torch
writes external data only above 2 GB. Within :func:`streamed_weights` the same export runs with
``export_params=False`` (the graph is built identically: tracing, constant folding and
initializer deduplication do not depend on it, only serialization does), the parameter dict
that torch's ``_model_to_graph`` returns (weights and constant-folded tensors, by the names the
graph's weight inputs carry) is kept, and once optimum's ``export_pytorch`` returns the small saved graph gets
its weights back as initializers whose bytes are appended one tensor at a time to
``model.onnx_data`` (optimum's own name, so its tied-weight pass re-saves in place). Nodes,
names, order and every value equal the plain export's; a test compares them.

This reaches into torch's exporter module (``_export`` and ``_model_to_graph`` are swapped for
the duration of the block only). When those names are gone (a torch upgrade), the block logs
once and the plain export runs, so an upgrade costs memory, never correctness.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ALIGN",
    "DATA_SUFFIX",
    "INLINE_BYTES",
    "StreamedExport",
    "attach_weights",
    "streamed_weights",
]

logger = logging.getLogger(__name__)

#: The external-data file is ``<model file name> + DATA_SUFFIX``, optimum's convention.
DATA_SUFFIX = "_data"
#: Tensors smaller than this stay inline (onnx's own default threshold).
INLINE_BYTES = 1024
#: Offsets of external tensors are multiples of this, so each can be memory-mapped cheaply.
ALIGN = 4096

_TORCH_EXPORTER = "torch.onnx._internal.torchscript_exporter.utils"
_lock = threading.Lock()  # the swaps are process-wide; one streamed export at a time


@dataclass
class StreamedExport:
    """What a :func:`streamed_weights` block did: the files given weights, and the bytes written."""

    active: bool = True
    files: list[Path] = field(default_factory=list)
    external_bytes: int = 0


def _raw(tensor: Any) -> Any:
    """The tensor's little-endian bytes as a flat uint8 numpy view (no copy when contiguous)."""
    import torch

    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().reshape(-1).view("uint8")


def attach_weights(
    path: Path,
    params: dict[str, Any],
    *,
    inputs: tuple[str, ...] | None = None,
    location: str | None = None,
    inline_bytes: int = INLINE_BYTES,
) -> int:
    """Turn the graph inputs of ``path`` named in ``params`` into initializers; return the bytes
    written to the external-data file ``location`` (default ``<name>_data``) next to it.

    Each tensor is written as soon as it is converted, so at most one tensor's bytes are copied at
    a time; tensors under ``inline_bytes`` stay in the graph as raw data, as torch writes them.
    Any other graph input must be one of ``inputs`` (the model's own) when they are given.
    """
    import onnx

    path = Path(path)
    location = location or path.name + DATA_SUFFIX
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    kept = [v for v in graph.input if v.name not in params]
    weights = [v for v in graph.input if v.name in params]
    stray = [v.name for v in kept if inputs is not None and v.name not in inputs]
    if stray:  # a weight input the exporter did not report: the file would lack its values
        raise RuntimeError(f"{path} has inputs {stray} that are neither model inputs nor weights")
    written = 0
    with open(path.parent / location, "wb") as data:
        for value in weights:
            tensor = params[value.name]
            raw = _raw(tensor)
            init = onnx.TensorProto(
                name=value.name,
                data_type=value.type.tensor_type.elem_type,
                dims=list(tensor.shape),
            )
            if raw.nbytes < inline_bytes:
                init.raw_data = raw.tobytes()
            else:
                offset = -(-data.tell() // ALIGN) * ALIGN
                if offset > data.tell():
                    data.write(b"\0" * (offset - data.tell()))
                data.write(memoryview(raw))
                init.data_location = onnx.TensorProto.EXTERNAL
                for key, val in (
                    ("location", location),
                    ("offset", offset),
                    ("length", raw.nbytes),
                ):
                    entry = init.external_data.add()
                    entry.key, entry.value = key, str(val)
                written += raw.nbytes
            graph.initializer.append(init)
            del raw, tensor
    del graph.input[:]
    graph.input.extend(kept)
    onnx.save(proto, str(path))
    if not written:
        (path.parent / location).unlink()
    return written


@contextlib.contextmanager
def streamed_weights() -> Iterator[StreamedExport]:
    """Within the block, optimum's ONNX exports write their weights tensor by tensor to
    ``<model>.onnx_data`` instead of serializing the whole model in memory."""
    try:
        torch_utils = importlib.import_module(_TORCH_EXPORTER)
        from optimum.exporters.onnx import convert

        names = ("_export", "_model_to_graph")
        originals = [getattr(torch_utils, n) for n in names] + [convert.export_pytorch]
        signature = inspect.signature(originals[0])
        if not {"f", "export_params", "input_names"} <= set(signature.parameters):
            raise AttributeError(f"{_TORCH_EXPORTER}._export{signature} has changed")
    except (ImportError, AttributeError) as exc:
        logger.info("Streamed export unavailable (%s); torch serializes the model whole", exc)
        yield StreamedExport(active=False)
        return
    export_, model_to_graph, export_pytorch = originals
    record = StreamedExport()
    state = threading.local()

    def capturing_model_to_graph(*args: Any, **kwargs: Any) -> Any:
        graph, params, out = model_to_graph(*args, **kwargs)
        state.params = params  # named as the exported graph's weight inputs will be
        return graph, params, out

    def weightless_export(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        pending = getattr(state, "pending", None)
        if pending is None or not call["export_params"] or not isinstance(call["f"], str):
            return export_(*args, **kwargs)
        state.params = None
        call["export_params"] = False
        out = export_(*bound.args, **bound.kwargs)
        params, state.params = state.params, None
        if params is None:  # torch no longer builds its graph through _model_to_graph
            logger.warning("Streamed export: torch reported no parameters; exporting whole")
            return export_(*args, **kwargs)
        names_in = call["input_names"]
        pending[call["f"]] = (params, None if names_in is None else tuple(names_in))
        return out

    def streaming_export_pytorch(*args: Any, **kwargs: Any) -> Any:
        state.pending = {}
        try:
            result = export_pytorch(*args, **kwargs)
            for f, (params, inputs) in state.pending.items():
                record.external_bytes += attach_weights(Path(f), params, inputs=inputs)
                record.files.append(Path(f))
            return result
        finally:
            state.pending = None

    with _lock:
        for name, swap in zip(names, (weightless_export, capturing_model_to_graph), strict=True):
            setattr(torch_utils, name, swap)
        convert.export_pytorch = streaming_export_pytorch
        try:
            yield record
        finally:
            for name, original in zip(names, originals, strict=False):
                setattr(torch_utils, name, original)
            convert.export_pytorch = export_pytorch
