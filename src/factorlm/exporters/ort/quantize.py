"""Dynamic int8 quantization of an engine, and the check that it covered every weight.

Why a coverage check: ORT's quantizer silently skips weights it does not recognize. factorlm's
factor matrices are exactly the weights a compressed model's speed depends on, so the build
counts the constant MatMul weights before and after and reports (and warns about) any left float.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

from factorlm.exporters.ort.optimize import EXTERNAL_DATA_THRESHOLD

__all__ = ["QuantizationReport", "constant_matmul_weights", "quantize_int8"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizationReport:
    """How dynamic int8 quantization covered the constant-weight MatMuls."""

    weights: int
    quantized: int
    factor_weights: int
    factor_quantized: int
    unquantized: tuple[str, ...]
    op_types: tuple[str, ...]
    weight_type: str
    per_channel: bool
    reduce_range: bool


def _is_factor(name: str, tensor: onnx.TensorProto | None, node: onnx.NodeProto) -> bool:
    if "factorlm" in name.lower() or "factorlm" in node.name.lower():
        return True
    props = list(getattr(tensor, "metadata_props", [])) + list(node.metadata_props)
    return any(p.key.lower().startswith("factorlm") for p in props)


def constant_matmul_weights(model: onnx.ModelProto) -> dict[str, bool]:
    """Float MatMul/Gemm weights that are constants: weight name -> whether it is a factor.

    A factor is a weight written by factorlm's passes: ``factorlm`` in the initializer or node
    name, or a ``factorlm*`` metadata key on either.
    """
    inits = {i.name: i for i in model.graph.initializer}
    constants = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    result: dict[str, bool] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        for name in node.input[:2]:
            tensor = inits.get(name)
            if (tensor is not None and tensor.data_type in floats) or name in constants:
                result[name] = result.get(name, False) or _is_factor(name, tensor, node)
    return result


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quantize_int8(
    source: Path, target: Path, *, weight_type: str, per_channel: bool, reduce_range: bool
) -> QuantizationReport:
    """Dynamic quantization of every constant MatMul/Attention weight, then a coverage check.

    The defaults (uint8 weights, per output channel) are measured, not guessed: on AVX2 CPUs
    without VNNI, ORT's u8 x s8 kernels sum pairs in saturating int16 (VPMADDUBSW), and on
    all-MiniLM-L6-v2 int8 weights gave a mean-pooled cosine of 0.955 (per-tensor) and 0.09 on the
    compressed model (per-channel), against 0.992 / 0.998 with uint8 per-channel weights.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    before = constant_matmul_weights(onnx.load(str(source), load_external_data=False))
    op_types = ("MatMul", "Attention")
    root = logging.getLogger()
    quiet = _DropMessage("Please consider to run pre-processing")
    root.addFilter(quiet)  # the quantizer nags on the root logger about an unrelated tool
    try:
        quantize_dynamic(
            str(source),
            str(target),
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QUInt8 if weight_type == "uint8" else QuantType.QInt8,
            use_external_data_format=source.stat().st_size > EXTERNAL_DATA_THRESHOLD,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
        )
    finally:
        root.removeFilter(quiet)
    after = constant_matmul_weights(onnx.load(str(target), load_external_data=False))
    left = tuple(sorted(name for name in before if name in after))
    factors = [name for name, is_factor in before.items() if is_factor]
    report = QuantizationReport(
        weights=len(before),
        quantized=len(before) - len(left),
        factor_weights=len(factors),
        factor_quantized=sum(1 for name in factors if name not in after),
        unquantized=left,
        op_types=op_types,
        weight_type=weight_type,
        per_channel=per_channel,
        reduce_range=reduce_range,
    )
    logger.info(
        "Quantized %s of %s constant MatMul weights (%s of %s factors)",
        report.quantized,
        report.weights,
        report.factor_quantized,
        report.factor_weights,
    )
    if left:
        logger.warning(
            "%s constant MatMul weights stayed float: %s", len(left), ", ".join(left[:5])
        )
    return report
