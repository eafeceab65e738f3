"""ONNX Runtime engines: optimized, optionally fp16 or int8, as .onnx or .ort, with a manifest.

An engine directory holds the engine file, the tokenizer/config files found next to the source
model (so a benchmark can tokenize text for it) and ``manifest.json``: what was built from what
(source sha256), with which options, library versions, providers, session settings, fusion counts
and sizes. Everything is written to a temporary directory that is renamed into place at the end,
so a failure never leaves a half-written engine behind.

Why each step:

* transformer fusions (Attention, SkipLayerNormalization, BiasGelu, ...) are where most of ONNX
  Runtime's CPU speed comes from, but they only apply when the architecture is known; otherwise
  the generic graph optimizations are applied offline;
* fp16 keeps the graph's input/output types and leaves overflow-prone nodes (powers, reductions,
  exponentials) in fp32;
* int8 is dynamic quantization of every MatMul with a constant weight, *including* the factor
  matrices of a compressed model; the build checks that none was skipped and reports the count;
* a factorized model goes through the optimizer with its factor pairs collapsed to exact dense
  stand-ins and gets them back afterwards, so it keeps the original's fusions (a jointly
  factorized Q/K/V becomes ``Attention(x @ L, [Rq Rk Rv])``, quantized to QAttention by int8);
  with ``reference`` the build compares its fusions with the original's and warns on a loss.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from factorlm.errors import BackendUnavailableError, ConfigError, FactorlmError
from factorlm.exporters.fusions import (
    collapse_factor_pairs,
    count_fusions,
    lost_fusions,
    restore_factor_pairs,
)
from factorlm.exporters.shapes import load_onnx

__all__ = [
    "FP16_OP_BLOCK_LIST",
    "MANIFEST_NAME",
    "MODEL_TYPES",
    "SIDECAR_FILES",
    "EngineManifest",
    "QuantizationReport",
    "build_ort_engine",
    "check_output_dir",
    "constant_matmul_weights",
    "copy_sidecars",
    "detect_model_type",
    "file_sha256",
    "infer_attention_dims",
    "open_session",
    "resolve_providers",
    "source_info",
    "staged_directory",
    "versions",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"

#: Architectures the transformer optimizer knows, mapped to its ``model_type``.
MODEL_TYPES: dict[str, str] = {"bert": "bert", "gpt2": "gpt2", "llama": "gpt2"}

#: Hugging Face ``config.json`` model types per architecture family.
_HF_FAMILIES: dict[str, str] = {
    **dict.fromkeys(
        ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet", "camembert"), "bert"
    ),
    **dict.fromkeys(("gpt2",), "gpt2"),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "smollm"), "llama"),
}

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

#: Files copied from the source model's folder so that engines can be benchmarked on real text.
SIDECAR_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)

_PROVIDER_ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}

# Large models must keep their weights in an external file (protobuf's 2 GB limit).
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


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


@dataclass(frozen=True)
class EngineManifest:
    """What an engine directory holds; saved as ``manifest.json`` next to the engine."""

    backend: str
    engine: str
    source: dict[str, Any]
    options: dict[str, Any]
    versions: dict[str, str]
    providers: list[str]
    session: dict[str, Any]
    fusions: dict[str, dict[str, int]]
    sizes: dict[str, int]
    model_type: str | None = None
    quantization: dict[str, Any] | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    directory: str = ""

    @property
    def engine_path(self) -> Path:
        """Absolute path of the engine file."""
        return Path(self.directory) / self.engine

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``directory`` is where it was loaded from, so it is not stored)."""
        data = asdict(self)
        data.pop("directory")
        return data

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``manifest.json`` into ``directory`` and return its path."""
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> EngineManifest:
        """Read the manifest of an engine directory."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ConfigError(f"{directory} is not an engine directory (no {MANIFEST_NAME}).")
        try:
            data = json.loads(path.read_text())
            return cls(**data, directory=str(Path(directory).resolve()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"{path} is not a valid engine manifest ({exc}).") from exc


# --------------------------------------------------------------------------------------------
# Small helpers shared with the TensorRT builder.


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, streamed so multi-GB weights do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _external_files(model: onnx.ModelProto, base: Path) -> list[Path]:
    """External data files referenced by ``model`` (loaded without its data), relative to ``base``."""
    names: set[str] = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    names.add(entry.value)
    return [base / name for name in sorted(names)]


def source_info(path: Path, model: onnx.ModelProto) -> dict[str, Any]:
    """Hash and size of a model file and its external data, for manifests."""
    external = _external_files(model, path.parent)
    return {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "external_data": {p.name: file_sha256(p) for p in external if p.is_file()},
        "bytes": path.stat().st_size + sum(p.stat().st_size for p in external if p.is_file()),
    }


def versions() -> dict[str, str]:
    """Versions of the libraries an engine depends on."""
    result = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in (
        "factorlm",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "onnx-ir",
        "numpy",
        "tensorrt",
    ):
        try:
            result[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return result


def copy_sidecars(source: Path, target: Path) -> list[str]:
    """Copy tokenizer and config files that sit next to ``source`` into ``target``."""
    copied = []
    for name in SIDECAR_FILES:
        candidate = source.parent / name
        if candidate.is_file():
            shutil.copy2(candidate, target / name)
            copied.append(name)
    return copied


def check_output_dir(source: Path, out: Path, *, overwrite: bool = False) -> None:
    """Refuse an output that is a file, holds files (unless ``overwrite``) or contains the source."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"Output {out} exists and is not a directory.")
    src = source.resolve()
    dst = out.resolve()
    if dst == src.parent or dst in src.parents:
        raise ConfigError(
            f"Output directory {out} contains the source model {source}; choose another -o so the "
            "input is not overwritten."
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"Output directory {out} is not empty; pass --overwrite to replace it.")


@contextmanager
def staged_directory(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``out_dir``; rename it into place on success.

    On any exception the temporary directory is removed and an existing ``out_dir`` is left
    untouched, so nothing is ever half-written.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an engine directory is meant to be shared
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Architecture detection.


def _read_config(source: Path) -> dict[str, Any]:
    path = source.parent / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}).") from exc
    return data if isinstance(data, dict) else {}


def detect_model_type(
    model: onnx.ModelProto, config: Mapping[str, Any] | None = None
) -> str | None:
    """``bert``, ``gpt2`` or ``llama`` from config.json's ``model_type``, else from the graph.

    The graph rule: decoders have past/present key-value inputs or outputs; RMS-norm or rotary
    ops make a decoder llama-like, LayerNorm makes it GPT-2-like; an ``input_ids`` encoder with
    LayerNorm and Softmax is BERT-like. Anything else returns None (plain graph optimization).
    """
    if config:
        hf_type = str(config.get("model_type", "")).lower()
        if hf_type in _HF_FAMILIES:
            return _HF_FAMILIES[hf_type]
    ops = {node.op_type for node in model.graph.node}
    in_names = [i.name for i in model.graph.input]
    out_names = [o.name for o in model.graph.output]
    decoder = any("past" in n for n in in_names) or any("present" in n for n in out_names)
    has_ln = bool(ops & {"LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization"})
    rms = bool(
        ops
        & {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization"}
    )
    rotary = bool(ops & {"RotaryEmbedding"}) or {"Sin", "Cos"} <= ops
    if decoder:
        if rms or rotary:
            return "llama"
        if has_ln:
            return "gpt2"
        return None
    if "input_ids" in in_names and has_ln and (ops & {"Softmax", "Attention"}):
        return "bert"
    return None


def _const_ints(model: onnx.ModelProto) -> dict[str, list[int]]:
    values: dict[str, list[int]] = {}
    for init in model.graph.initializer:
        if (
            init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
            and init.data_location != onnx.TensorProto.EXTERNAL
        ):
            arr = onnx.numpy_helper.to_array(init)
            if arr.size <= 8:
                values[init.name] = [int(v) for v in arr.ravel()]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in (
                    onnx.TensorProto.INT64,
                    onnx.TensorProto.INT32,
                ):
                    arr = onnx.numpy_helper.to_array(attr.t)
                    if arr.size <= 8:
                        values[node.output[0]] = [int(v) for v in arr.ravel()]
    return values


def infer_attention_dims(
    model: onnx.ModelProto, config: Mapping[str, Any] | None = None
) -> tuple[int, int]:
    """(num_heads, hidden_size) from config.json, else from the graph; 0 means unknown.

    From the graph: hidden size is the most common LayerNorm scale length; the head count is the
    most common ``h`` among Reshape target shapes ``[.., .., h, d]`` with ``h * d == hidden``.
    """
    config = config or {}
    heads = next(
        (int(config[k]) for k in ("num_attention_heads", "n_head", "num_heads") if k in config), 0
    )
    hidden = next((int(config[k]) for k in ("hidden_size", "n_embd", "d_model") if k in config), 0)
    if heads and hidden:
        return heads, hidden
    inits = {i.name: i for i in model.graph.initializer}
    if not hidden:
        sizes: Counter[int] = Counter()
        for node in model.graph.node:
            if (
                node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization")
                and len(node.input) > 1
            ):
                scale = inits.get(node.input[1])
                if scale is not None and len(scale.dims) == 1:
                    sizes[int(scale.dims[0])] += 1
        hidden = sizes.most_common(1)[0][0] if sizes else 0
    if not heads and hidden:
        consts = _const_ints(model)
        producers = {out: node for node in model.graph.node for out in node.output}
        candidates: Counter[int] = Counter()
        for node in model.graph.node:
            if node.op_type != "Reshape" or len(node.input) < 2:
                continue
            shape = consts.get(node.input[1])
            producer = producers.get(node.input[1])
            if shape is None and producer is not None and producer.op_type == "Concat":
                parts = []
                for name in producer.input:
                    src = producers.get(name)
                    if name in consts and len(consts[name]) == 1:
                        parts.append(consts[name][0])
                    elif src is not None and src.op_type == "Unsqueeze" and src.input[0] in consts:
                        parts.append(consts[src.input[0]][0])
                    else:
                        parts.append(-1)
                shape = parts
            if shape is not None and len(shape) == 4 and shape[2] > 0 < shape[3]:
                candidates.update([shape[2]] if shape[2] * shape[3] == hidden else [])
        heads = candidates.most_common(1)[0][0] if candidates else 0
    return heads, hidden


# --------------------------------------------------------------------------------------------
# Providers and sessions.


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """Full execution-provider names, checked against this onnxruntime build; CPU always last.

    Accepts short names (``cpu``, ``cuda``, ``tensorrt``) and full names, comma-separated or as a
    list. A provider that this build lacks raises ``BackendUnavailableError``.
    """
    import onnxruntime as ort

    if providers is None:
        return ["CPUExecutionProvider"]
    items = providers.split(",") if isinstance(providers, str) else list(providers)
    available = ort.get_available_providers()
    resolved: list[str] = []
    for item in (p.strip() for p in items):
        if not item:
            continue
        name = _PROVIDER_ALIASES.get(item.lower(), item)
        if name not in available:
            known = ", ".join(available)
            hint = (
                "install the gpu extra with `pip install factorlm[gpu]` (onnxruntime-gpu)"
                if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                else "choose one of the available providers"
            )
            raise BackendUnavailableError(
                f"Execution provider {item!r} is not available in this onnxruntime build "
                f"(available: {known}); {hint}."
            )
        if name not in resolved:
            resolved.append(name)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


_LEVELS = {
    "disable_all": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def _session_options(settings: Mapping[str, Any], intra_op_num_threads: int | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    level = str(settings.get("graph_optimization_level", "ORT_ENABLE_ALL"))
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    threads = (
        intra_op_num_threads
        if intra_op_num_threads is not None
        else settings.get("intra_op_num_threads", 0)
    )
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = int(settings.get("inter_op_num_threads", 0))
    return so


def open_session(
    engine_dir: str | os.PathLike[str],
    *,
    providers: Sequence[str] | str | None = None,
    intra_op_num_threads: int | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for an engine directory, with its recorded settings."""
    import onnxruntime as ort

    manifest = EngineManifest.load(engine_dir)
    if manifest.backend != "ort":
        raise ConfigError(
            f"{engine_dir} holds a {manifest.backend} engine, not an ONNX Runtime one."
        )
    chosen = resolve_providers(providers) if providers is not None else manifest.providers
    so = _session_options(manifest.session, intra_op_num_threads)
    return ort.InferenceSession(str(manifest.engine_path), so, providers=chosen)


# --------------------------------------------------------------------------------------------
# Quantization coverage.


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


def _quantize_int8(
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
            use_external_data_format=source.stat().st_size > _EXTERNAL_DATA_THRESHOLD,
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


# --------------------------------------------------------------------------------------------
# The build.


def _save(model: onnx.ModelProto, path: Path) -> None:
    large = model.ByteSize() > _EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=path.name + ".data" if large else None,
    )


def _ort_optimize(source: Path, target: Path, level: str, providers: list[str]) -> None:
    """Generic ONNX Runtime graph optimization, saved offline (for unknown architectures)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = str(target)
    if source.stat().st_size > _EXTERNAL_DATA_THRESHOLD:
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", target.name + ".data"
        )
    ort.InferenceSession(str(source), so, providers=providers)


def _to_ort_format(source: Path, target: Path, level: str) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = str(target)
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(source), so, providers=["CPUExecutionProvider"])


def _engine_bytes(directory: Path, engine: str) -> int:
    """The engine file plus its external data (every file whose name starts with ``model.``)."""
    del engine
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith("model."))


def _optimize_factorized(
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
        _save(proto, path)
        del proto
        opt = optimize_model(str(path), **kwargs)  # onnx.load brings every tensor into memory
    report = restore_factor_pairs(opt.model, collapsed)
    extra["factor_fusion"] = asdict(report)
    return opt


def build_ort_engine(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    optimize: bool = True,
    model_type: str | None = None,
    fp16: bool = False,
    int8: bool = False,
    format: str = "onnx",
    providers: Sequence[str] | str | None = None,
    int8_weight_type: str = "uint8",
    int8_per_channel: bool = True,
    int8_reduce_range: bool = False,
    fuse_factors: bool = True,
    reference: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> EngineManifest:
    """Build an ONNX Runtime engine directory from ``model`` and return its manifest.

    ``model_type`` is ``bert``, ``gpt2``, ``llama``, ``none`` (plain graph optimization) or None
    (detect from config.json next to the model, else from the graph). ``format="ort"`` writes an
    ORT-format model for mobile and edge runtimes. A non-empty ``out_dir`` is replaced only with
    ``overwrite``. ``progress`` receives a short label per step.

    ``fuse_factors`` lets the transformer optimizer see through factorlm's factor pairs, so a
    compressed model keeps the Attention (with a joint Q/K/V factorization) and
    EmbedLayerNormalization fusions (``fusions.collapse_factor_pairs``). ``reference`` (the
    original model) is optimized the same way; its fusion counts are recorded and every fusion
    the engine lacks is logged as a warning and listed in ``extra["lost_fusions"]``.
    """
    source = Path(model)
    say = progress or (lambda _msg: None)
    if format not in ("onnx", "ort"):
        raise ConfigError(f"Unknown engine format {format!r}; choose 'onnx' or 'ort'.")
    if fp16 and int8:
        raise ConfigError("--fp16 and --int8 cannot be combined; choose one precision.")
    if int8_weight_type not in ("int8", "uint8"):
        raise ConfigError(
            f"Unknown int8 weight type {int8_weight_type!r}; choose 'uint8' or 'int8'."
        )
    if model_type is not None and model_type not in (*MODEL_TYPES, "none", "auto"):
        choices = ", ".join((*MODEL_TYPES, "none"))
        raise ConfigError(f"Unknown model type {model_type!r}; choose one of {choices}.")
    header = load_onnx(source)
    chosen = resolve_providers(providers)
    check_output_dir(source, Path(out_dir), overwrite=overwrite)
    config = _read_config(source)
    if model_type in (None, "auto"):
        resolved_type = detect_model_type(header, config)
    else:
        resolved_type = None if model_type == "none" else model_type
    use_gpu = any(p in chosen for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
    say("hashing source")
    src_info = source_info(source, header)
    source_fusions = count_fusions(header)
    heads, hidden = (0, 0)
    optimizer = "none"
    runtime_level = "ORT_DISABLE_ALL"
    quant: QuantizationReport | None = None
    notes: dict[str, Any] = {}
    fusions: dict[str, dict[str, int]] = {"source": source_fusions}

    with staged_directory(out_dir) as tmp:
        work = tmp / "model.onnx"
        try:
            if optimize and resolved_type is not None:
                from onnxruntime.transformers.optimizer import optimize_model

                heads, hidden = infer_attention_dims(header, config)
                say(f"transformer fusions ({resolved_type})")
                logger.info(
                    "Transformer optimizer: model_type=%s num_heads=%s hidden_size=%s",
                    resolved_type,
                    heads,
                    hidden,
                )
                opt = _optimize_factorized(
                    source,
                    model_type=MODEL_TYPES[resolved_type],
                    num_heads=heads,
                    hidden_size=hidden,
                    use_gpu=use_gpu,
                    fuse_factors=fuse_factors,
                    extra=notes,
                )
                fusions["optimized"] = count_fusions(opt.model)
                if reference is not None:
                    say("optimizing the reference")
                    ref = optimize_model(
                        str(reference),
                        model_type=MODEL_TYPES[resolved_type],
                        num_heads=heads,
                        hidden_size=hidden,
                        use_gpu=use_gpu,
                    )
                    fusions["reference"] = count_fusions(ref.model)
                    del ref
                if fp16:
                    say("fp16")
                    opt.convert_float_to_float16(
                        keep_io_types=True, op_block_list=list(FP16_OP_BLOCK_LIST)
                    )
                opt.save_model_to_file(
                    str(work),
                    use_external_data_format=opt.model.ByteSize() > _EXTERNAL_DATA_THRESHOLD,
                )
                optimizer = "transformers"
                runtime_level = "ORT_ENABLE_ALL"
            else:
                if optimize:
                    say("graph optimization")
                    _ort_optimize(source, work, "ORT_ENABLE_EXTENDED", ["CPUExecutionProvider"])
                    optimizer = "graph"
                    runtime_level = "ORT_ENABLE_ALL"
                else:
                    say("copying model")
                    _save(onnx.load(str(source)), work)
                if fp16:
                    from onnxruntime.transformers.onnx_model import OnnxModel

                    say("fp16")
                    half = OnnxModel(onnx.load(str(work)))
                    half.convert_float_to_float16(
                        keep_io_types=True, op_block_list=list(FP16_OP_BLOCK_LIST)
                    )
                    for extra in tmp.iterdir():
                        extra.unlink()
                    _save(half.model, work)
            if int8:
                say("int8 dynamic quantization")
                quantized = tmp / "model.int8.onnx"
                quant = _quantize_int8(
                    work,
                    quantized,
                    weight_type=int8_weight_type,
                    per_channel=int8_per_channel,
                    reduce_range=int8_reduce_range,
                )
                for extra in list(tmp.iterdir()):
                    if extra.name.startswith("model.onnx"):
                        extra.unlink()
                # External data (if any) keeps the file name recorded inside the model.
                os.replace(quantized, work)
            engine_fusions = count_fusions(work)
            fusions["engine"] = engine_fusions
            if reference is not None and "reference" not in fusions:
                fusions["reference"] = count_fusions(reference)
            if "reference" in fusions:
                lost = lost_fusions(fusions["reference"], fusions.get("optimized", engine_fusions))
                notes["lost_fusions"] = lost
                if lost:
                    logger.warning(
                        "The engine lost fusions the reference model has: %s",
                        ", ".join(f"{name} ({n} fewer)" for name, n in lost.items()),
                    )
            engine = "model.onnx"
            if format == "ort":
                say("ORT format")
                level = "ORT_ENABLE_EXTENDED" if optimize else "ORT_DISABLE_ALL"
                _to_ort_format(work, tmp / "model.ort", level)
                for extra in list(tmp.iterdir()):
                    if extra.name != "model.ort":
                        extra.unlink()
                engine = "model.ort"
        except FactorlmError:
            raise
        except Exception as exc:
            raise FactorlmError(
                f"ONNX Runtime could not build an engine from {source}: {type(exc).__name__}: {exc}"
            ) from exc

        say("checking the engine loads")
        session_settings = {
            "graph_optimization_level": runtime_level,
            "intra_op_num_threads": 0,
            "inter_op_num_threads": 0,
            "execution_mode": "ORT_SEQUENTIAL",
        }
        import onnxruntime as ort

        try:
            sess = ort.InferenceSession(
                str(tmp / engine), _session_options(session_settings), providers=chosen
            )
        except Exception as exc:
            raise FactorlmError(
                f"The built engine {engine} does not load in ONNX Runtime: {exc}"
            ) from exc
        files = copy_sidecars(source, tmp)
        manifest = EngineManifest(
            backend="ort",
            engine=engine,
            source=src_info,
            options={
                "optimize": optimize,
                "optimizer": optimizer,
                "model_type": model_type,
                "num_heads": heads,
                "hidden_size": hidden,
                "fp16": fp16,
                "fp16_op_block_list": list(FP16_OP_BLOCK_LIST) if fp16 else [],
                "int8": int8,
                "format": format,
                "fuse_factors": fuse_factors,
                "reference": str(reference) if reference is not None else None,
            },
            versions=versions(),
            providers=chosen,
            session=session_settings,
            fusions=fusions,
            sizes={
                "source_bytes": int(src_info["bytes"]),
                "engine_bytes": _engine_bytes(tmp, engine),
            },
            model_type=resolved_type,
            quantization=asdict(quant) if quant is not None else None,
            inputs=[
                {
                    "name": i.name,
                    "type": i.type,
                    "shape": [d if isinstance(d, int) else str(d) for d in i.shape],
                }
                for i in sess.get_inputs()
            ],
            outputs=[o.name for o in sess.get_outputs()],
            files=files,
            extra=notes,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        del sess
        manifest.save(tmp)
    final = EngineManifest.load(out_dir)
    logger.info(
        "Built ORT engine %s (%s bytes, %s)",
        final.engine_path,
        final.sizes["engine_bytes"],
        {k: v for k, v in final.fusions["engine"].items() if v},
    )
    return final
