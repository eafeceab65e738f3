"""Offline graph work for an engine: transformer fusions through factor pairs, fp16, ORT format.

Why: the transformer optimizer only fuses exact subgraphs, so a factorized model is optimized
with its factor pairs collapsed to exact dense stand-ins and gets them back afterwards; fp16
keeps the graph's input/output types and leaves overflow-prone nodes in fp32; models over the
protobuf limit keep their weights in one external file.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

from factorlm._common.sessions import create_session, session_options
from factorlm.exporters.fusions import collapse_factor_pairs, restore_factor_pairs
from factorlm.io import EXTERNAL_DATA_THRESHOLD  # protobuf's 2 GB limit, one definition

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "FP16_OP_BLOCK_LIST",
    "optimize_factorized",
    "ort_optimize",
    "save_model",
    "to_fp16",
    "to_ort_format",
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


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save ``model``; past the protobuf limit its tensors go to one ``<name>.data`` file."""
    large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
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
    if source.stat().st_size > EXTERNAL_DATA_THRESHOLD:
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
    from onnxruntime.transformers.optimizer import optimize_model

    kwargs = {
        "model_type": model_type,
        "num_heads": num_heads,
        "hidden_size": hidden_size,
        "use_gpu": use_gpu,
    }
    if not fuse_factors:
        return optimize_model(str(source), **kwargs)
    proto = onnx.load(str(source))
    collapsed = collapse_factor_pairs(proto)
    if not collapsed:
        del proto
        extra["factor_fusion"] = asdict(restore_factor_pairs(onnx.ModelProto(), collapsed))
        return optimize_model(str(source), **kwargs)
    with tempfile.TemporaryDirectory(prefix="factorlm-collapsed-") as folder:
        path = Path(folder) / "model.onnx"
        save_model(proto, path)
        del proto
        opt = optimize_model(str(path), **kwargs)  # onnx.load brings every tensor into memory
    report = restore_factor_pairs(opt.model, collapsed)
    extra["factor_fusion"] = asdict(report)
    return opt
