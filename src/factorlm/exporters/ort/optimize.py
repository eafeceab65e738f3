"""Offline graph work for an engine: transformer fusions through factor pairs, fp16, ORT format.

Why: the transformer optimizer only fuses exact subgraphs, so a factorized model is optimized
with its factor pairs collapsed to exact dense stand-ins and gets them back afterwards; fp16
keeps the graph's input/output types and leaves overflow-prone nodes in fp32; models over the
protobuf limit keep their weights in one external file.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

from factorlm._common.outputs import external_data_files
from factorlm._common.sessions import create_session, session_options
from factorlm.exporters.fusions import collapse_factor_pairs, restore_factor_pairs
from factorlm.io import EXTERNAL_DATA_THRESHOLD  # protobuf's 2 GB limit, one definition

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "FP16_OP_BLOCK_LIST",
    "optimize_factorized",
    "optimize_transformer",
    "ort_optimize",
    "save_model",
    "save_optimized",
    "to_fp16",
    "to_ort_format",
    "write_proto",
]

logger = logging.getLogger(__name__)


#: Ops kept in fp32 by ``fp16=True`` because their intermediate values overflow fp16 easily.
FP16_OP_BLOCK_LIST: tuple[str, ...] = (
    "Pow",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "Exp",
    "Softmax",
    "Range",
    "CumSum",
    "TopK",
    "Min",
    "Max",
)


#: Messages that may hold large payloads: written field by field, never serialized whole.
_CONTAINERS = frozenset(
    f"onnx.{name}"
    for name in (
        "ModelProto",
        "GraphProto",
        "FunctionProto",
        "NodeProto",
        "AttributeProto",
        "TensorProto",
        "SparseTensorProto",
        "TrainingInfoProto",
    )
)


class _UnknownFields(Exception):
    """A message carries fields this onnx version does not know: save it the ordinary way."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pieces(message: Any, sizes_only: bool) -> Iterator[bytes | int]:
    """``message``'s wire encoding in order, as bytes (or only their sizes, ``sizes_only``).

    Fields go out in field-number order, as protobuf encodes them. A container sub-message is
    framed by its tag and size and encoded recursively; anything else is serialized alone, so
    at most one tensor's bytes exist at a time.
    """
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
    except ImportError:  # pragma: no cover - protobuf < 4.22
        UnknownFieldSet = None
    if UnknownFieldSet is not None and len(UnknownFieldSet(message)):
        raise _UnknownFields
    for desc, value in message.ListFields():
        tag = _varint(desc.number << 3 | 2)
        repeated = hasattr(value, "extend")
        if desc.message_type is None:
            if not repeated and desc.type in (desc.TYPE_BYTES, desc.TYPE_STRING):
                data = value.encode("utf-8") if isinstance(value, str) else value
                yield tag + _varint(len(data))
                yield len(data) if sizes_only else data
                continue
            single = type(message)()
            _copy_field(single, desc, value)
            yield single.ByteSize() if sizes_only else single.SerializeToString()
            continue
        for item in value if repeated else [value]:
            if item.DESCRIPTOR.full_name in _CONTAINERS:
                size = _encoded_size(item)
                yield tag + _varint(size)
                if sizes_only:
                    yield size
                else:
                    yield from _pieces(item, sizes_only=False)
            else:
                size = item.ByteSize()
                yield tag + _varint(size)
                yield size if sizes_only else item.SerializeToString()


def _encoded_size(message: Any) -> int:
    return sum(p if isinstance(p, int) else len(p) for p in _pieces(message, sizes_only=True))


def write_proto(model: onnx.ModelProto, path: Path) -> None:
    """``onnx.save_model(model, path)``, the same bytes, without the whole serialization in memory.

    Why: protobuf serializes a model into one buffer (its ``ByteSize`` too) and Python copies
    it into ``bytes``: twice the model next to the model itself. Written piece by piece, at most
    one tensor's bytes are held at a time.
    """
    try:
        with path.open("wb") as handle:
            for piece in _pieces(model, sizes_only=False):
                assert isinstance(piece, bytes)
                handle.write(piece)
    except _UnknownFields:
        logger.debug("%s has fields unknown to onnx: saved in one piece", path)
        onnx.save_model(model, str(path))


def save_optimized(opt: Any, path: Path) -> None:
    """Write what ORT's ``OnnxModel.save_model_to_file`` writes, without a whole serialization.

    Past the protobuf limit ORT's own external-data save is used unchanged.
    """
    model = opt.model
    if _encoded_size(model) > EXTERNAL_DATA_THRESHOLD:
        opt.save_model_to_file(str(path), use_external_data_format=True)
        return
    opt.topological_sort()
    # OnnxModel.save: declare the com.microsoft opset when a fused contrib op needs it
    if not any(o.domain == "com.microsoft" for o in model.opset_import) and any(
        n.domain == "com.microsoft" for n in model.graph.node
    ):
        opset = model.opset_import.add()
        opset.version = 1
        opset.domain = "com.microsoft"
    write_proto(model, path)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save ``model``; past the protobuf limit its tensors go to one ``<name>.data`` file."""
    large = _encoded_size(model) > EXTERNAL_DATA_THRESHOLD
    if not large:
        write_proto(model, path)
        return
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=path.name + ".data" if large else None,
    )


def ort_optimize(source: Path, target: Path, level: str, providers: list[str]) -> None:
    """Generic ONNX Runtime graph optimization, saved offline (for unknown architectures)."""
    entries = {}
    # A source with external data must be saved with external data too: ORT otherwise keeps
    # references to the source's data file name, which does not exist next to ``target``.
    if source.stat().st_size > EXTERNAL_DATA_THRESHOLD or external_data_files(source):
        entries["session.optimized_model_external_initializers_file_name"] = target.name + ".data"
    options = session_options(
        graph_optimization_level=level, optimized_model_filepath=target, config_entries=entries
    )
    create_session(source, options=options, providers=providers)


def to_ort_format(source: Path, target: Path, level: str) -> None:
    """Save ``source`` as an ORT-format model (for mobile and edge runtimes)."""
    options = session_options(
        graph_optimization_level=level,
        optimized_model_filepath=target,
        config_entries={"session.save_model_format": "ORT"},
    )
    create_session(source, options=options, providers=["CPUExecutionProvider"])


def to_fp16(work: Path) -> None:
    """Convert the model at ``work`` (and its external data) to fp16 in place, I/O kept fp32."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    half = OnnxModel(onnx.load(str(work)))
    half.convert_float_to_float16(keep_io_types=True, op_block_list=list(FP16_OP_BLOCK_LIST))
    for extra in work.parent.iterdir():
        if extra.name.startswith(work.name):
            extra.unlink()
    save_model(half.model, work)


#: Initializers of rank 2 or more above this size are left out of shape inference's model copy.
_SHAPE_VIEW_BYTES = 1024


def _shape_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as symbolic shape inference needs it: large weight matrices as typed inputs.

    Why: ORT's ``SymbolicShapeInference`` copies the whole model (twice, into protobuf arenas
    that stay allocated while the helper lives) on every ``infer_runtime_shape`` of a fusion;
    on BERT-base that is 0.8 GB per helper, several helpers alive at once. Shape inference reads
    only the dims of a rank >= 2 initializer: the one place it reads such a value
    (``_get_int_or_float_values``) discards values of rank > 1, and every other value it reads is
    a scalar or a 1-D shape/axes/index tensor. A graph input with the same type and dims gives
    the same shapes, so the copy leaves those payloads out and every inferred shape is unchanged.
    """
    graph = model.graph
    heavy = {
        t.name
        for t in graph.initializer
        if len(t.dims) >= 2 and len(t.raw_data) > _SHAPE_VIEW_BYTES
    }
    if not heavy:
        return model
    view = onnx.ModelProto()
    for desc, value in model.ListFields():
        if desc.name != "graph":
            _copy_field(view, desc, value)
    for desc, value in graph.ListFields():
        if desc.name != "initializer":
            _copy_field(view.graph, desc, value)
    listed = {i.name for i in graph.input}
    for tensor in graph.initializer:
        if tensor.name not in heavy:
            view.graph.initializer.add().CopyFrom(tensor)
        elif tensor.name not in listed:
            view.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    return view


def _copy_field(target: Any, desc: Any, value: Any) -> None:
    if hasattr(value, "extend"):  # a repeated field
        getattr(target, desc.name).extend(value)
    elif desc.message_type is not None:
        getattr(target, desc.name).CopyFrom(value)
    else:
        setattr(target, desc.name, value)


@contextlib.contextmanager
def _light_shape_inference() -> Iterator[None]:
    """While the transformer optimizer runs, its shape-inference helpers copy ``_shape_view``s.

    Only ``SymbolicShapeInferenceHelper`` (the optimizer's ``infer_runtime_shape``) is changed;
    ORT's other shape inference (fp16 conversion, subgraphs) keeps its own behaviour.
    """
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts ORT's tools on sys.path)
    from shape_infer_helper import SymbolicShapeInferenceHelper  # the name ORT imports it by

    original = SymbolicShapeInferenceHelper.__dict__.get("_preprocess")
    inherited = SymbolicShapeInferenceHelper._preprocess

    def preprocess(self: Any, in_mp: onnx.ModelProto) -> None:
        inherited(self, _shape_view(in_mp))

    SymbolicShapeInferenceHelper._preprocess = preprocess
    try:
        yield
    finally:
        if original is None:
            del SymbolicShapeInferenceHelper._preprocess
        else:
            SymbolicShapeInferenceHelper._preprocess = original


#: ``optimize_model``'s ONNX Runtime levels and the optimizers it disables at each.
_ORT_LEVELS = {1: "ORT_ENABLE_BASIC", 2: "ORT_ENABLE_EXTENDED", 99: "ORT_ENABLE_ALL"}
_FUSION_CONFLICTS = [
    "MatMulScaleFusion",
    "MatMulAddFusion",
    "MatmulTransposeFusion",
    "GemmActivationFusion",
    "BiasSoftmaxFusion",
]


def _uses_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _ort_prepass(source: Path, target: Path, level: int) -> None:
    """``optimize_model``'s ONNX Runtime pre-pass on CPU, the same graph saved the same way.

    Why run it here: ORT's own pre-pass keeps a second full copy of the model loaded while its
    session optimizes, and the session pre-packs every MatMul weight for kernels that never run.
    This session holds only what ORT needs and skips pre-packing (which happens after the
    optimized graph is saved, so the saved file is byte-for-byte the same).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[level])
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.disable_prepacking", "1")
    if _uses_external_data(source):
        gc.collect()
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", target.name + ".data"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    disabled = ["ConstantSharing", *(_FUSION_CONFLICTS if level > 1 else [])]
    session = ort.InferenceSession(
        str(source), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )
    del session


def optimize_transformer(source: Path, **kwargs: Any) -> Any:
    """ORT's ``optimize_model(source, **kwargs)`` within a bounded memory, same result.

    Its ONNX Runtime pre-pass runs in :func:`_ort_prepass` (CPU builds) and its Python fusions
    do shape inference on weightless model copies (:func:`_light_shape_inference`).
    """
    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    model_type = kwargs.get("model_type", "bert")
    level = kwargs.get("opt_level")
    if level is None and model_type in MODEL_TYPES:
        level = MODEL_TYPES[model_type][2]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_light_shape_inference())
        if level in _ORT_LEVELS and not kwargs.get("use_gpu"):
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="factorlm-o-")))
            prepassed = folder / f"model_o{level}_cpu.onnx"  # optimize_model's own file name
            _ort_prepass(source, prepassed, level)
            gc.collect()
            opt = optimize_model(str(prepassed), **{**kwargs, "opt_level": 0})
        else:
            opt = optimize_model(str(source), **kwargs)
    # The fusions keep their helpers (and each other) in reference cycles: collect them now.
    opt.shape_infer_helper = None
    gc.collect()
    return opt


def optimize_factorized(
    source: Path,
    *,
    model_type: str,
    num_heads: int,
    hidden_size: int,
    use_gpu: bool,
    fuse_factors: bool,
    extra: dict[str, Any],
) -> Any:
    """ORT's transformer optimizer, run through factor pairs collapsed to dense stand-ins.

    The optimizer only fuses exact subgraphs; collapsing factor pairs to their exact products
    lets it fuse Attention and EmbedLayerNormalization, after which the factors are put back
    (into the Attention node's input and weight for a joint Q/K/V). ``extra["factor_fusion"]``
    records what was restored.
    """
    kwargs = {
        "model_type": model_type,
        "num_heads": num_heads,
        "hidden_size": hidden_size,
        "use_gpu": use_gpu,
    }
    if not fuse_factors:
        return optimize_transformer(source, **kwargs)
    proto = onnx.load(str(source))
    collapsed = collapse_factor_pairs(proto)
    if not collapsed:
        del proto
        extra["factor_fusion"] = asdict(restore_factor_pairs(onnx.ModelProto(), collapsed))
        return optimize_transformer(source, **kwargs)
    with tempfile.TemporaryDirectory(prefix="factorlm-collapsed-") as folder:
        path = Path(folder) / "model.onnx"
        save_model(proto, path)
        del proto
        opt = optimize_transformer(path, **kwargs)  # onnx.load brings every tensor into memory
    report = restore_factor_pairs(opt.model, collapsed)
    extra["factor_fusion"] = asdict(report)
    return opt
