"""ONNX Runtime engines: optimized, optionally fp16 or int8, as .onnx or .ort, with a manifest.

An engine directory holds the engine file, the tokenizer/config files found next to the source
model (so a benchmark can tokenize text for it) and ``manifest.json``: what was built from what
(source sha256), with which options, library versions, providers, session settings, fusion counts
and sizes.

Why each step:

* transformer fusions (Attention, SkipLayerNormalization, BiasGelu, ...) are where most of ONNX
  Runtime's CPU speed comes from, but they only apply when the architecture is known
  (:mod:`.architecture`); otherwise the generic graph optimizations are applied offline;
* fp16 keeps the graph's input/output types and leaves overflow-prone nodes (powers, reductions,
  exponentials) in fp32 (:mod:`.optimize`);
* int8 is dynamic quantization of every MatMul with a constant weight, *including* the factor
  matrices of a compressed model; the build checks that none was skipped and reports the count
  (:mod:`.quantize`);
* a factorized model goes through the optimizer with its factor pairs collapsed to exact dense
  stand-ins and gets them back afterwards, so it keeps the original's fusions (a jointly
  factorized Q/K/V becomes ``Attention(x @ L, [Rq Rk Rv])``, quantized to QAttention by int8);
  with ``reference`` the build compares its fusions with the original's and warns on a loss.

Modules: :mod:`.manifest` (what a directory holds), :mod:`.architecture`, :mod:`.optimize`,
:mod:`.quantize`, :mod:`.build` (the steps in order). File helpers (hashing, staging, sidecars,
versions) live in :mod:`factorlm._common.files`, sessions in :mod:`factorlm._common.sessions`.
"""

from __future__ import annotations

import logging

from factorlm.exporters.ort.architecture import (
    MODEL_TYPES,
    detect_model_type,
    infer_attention_dims,
    read_config,
)
from factorlm.exporters.ort.build import build_ort_engine
from factorlm.exporters.ort.manifest import (
    MANIFEST_NAME,
    EngineManifest,
    check_output_dir,
    source_info,
)
from factorlm.exporters.ort.optimize import FP16_OP_BLOCK_LIST
from factorlm.exporters.ort.quantize import QuantizationReport, constant_matmul_weights

__all__ = [
    "FP16_OP_BLOCK_LIST",
    "MANIFEST_NAME",
    "MODEL_TYPES",
    "EngineManifest",
    "QuantizationReport",
    "build_ort_engine",
    "check_output_dir",
    "constant_matmul_weights",
    "detect_model_type",
    "infer_attention_dims",
    "read_config",
    "source_info",
]

logger = logging.getLogger(__name__)
