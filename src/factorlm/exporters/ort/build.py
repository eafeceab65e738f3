"""Build an ONNX Runtime engine directory: optimize, optionally fp16, int8 or int4, .onnx or .ort.

An engine directory holds the engine file, the tokenizer/config files found next to the source
model (so a benchmark can tokenize text for it) and ``manifest.json``. Everything is written to
a staged folder that is renamed into place at the end, so a failure never leaves a half-written
engine behind. The build is a short sequence of steps over one :class:`_Build` record: check the
options (and read the calibration texts of static int8), optimize (transformer fusions or
generic graph optimization, then fp16), quantize (dynamic int8, static QDQ int8 or int4
weight-only), count fusions, convert to ORT format, check that the engine loads, write the
manifest.
"""

from __future__ import annotations

import datetime as _dt
import gc
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from factorlm._common.files import copy_sidecars, sidecar_paths, staged_directory, versions
from factorlm._common.sessions import create_session, resolve_providers
from factorlm.errors import ConfigError, FactorlmError, ModelLoadError
from factorlm.exporters.fusions import count_fusions, lost_fusions
from factorlm.exporters.ort.architecture import (
    MODEL_TYPES,
    detect_model_type,
    infer_attention_dims,
    read_config,
)
from factorlm.exporters.ort.manifest import EngineManifest, check_output_dir, source_info
from factorlm.exporters.ort.optimize import (
    FP16_OP_BLOCK_LIST,
    optimize_factorized,
    optimize_transformer,
    ort_optimize,
    save_model,
    save_optimized,
    to_fp16,
    to_ort_format,
)
from factorlm.exporters.ort.quantize import (
    QuantizationReport,
    quantize_int4,
    quantize_int8,
    quantize_static_int8,
)
from factorlm.exporters.shapes import load_onnx, model_inputs
from factorlm.options import BuildOptions, replace

__all__ = ["build_ort_engine"]

logger = logging.getLogger(__name__)

_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass
class _Build:
    """What the steps of one build learn, in the order they learn it."""

    source: Path
    header: onnx.ModelProto
    config: dict[str, Any]
    model_type: str | None
    providers: list[str]
    say: Callable[[str], None]
    heads: int = 0
    hidden: int = 0
    optimizer: str = "none"
    runtime_level: str = "ORT_DISABLE_ALL"
    quant: QuantizationReport | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    fusions: dict[str, dict[str, int]] = field(default_factory=dict)
    saved_counts: dict[str, int] | None = None  # the saved engine's, counted before saving

    @property
    def use_gpu(self) -> bool:
        return any(p in self.providers for p in _GPU_PROVIDERS)


def _resolve_options(options: BuildOptions | None, overrides: dict[str, Any]) -> BuildOptions:
    """``options`` with keyword overrides applied (``providers`` may be one comma string)."""
    opts = options or BuildOptions()
    if isinstance(overrides.get("providers"), str):
        overrides["providers"] = tuple(
            p.strip() for p in overrides["providers"].split(",") if p.strip()
        )
    if overrides.get("providers") is None and "providers" in overrides:
        overrides["providers"] = ()
    if overrides:
        opts = replace(opts, **overrides)
    if opts.backend != "ort":
        raise ConfigError(f"build_ort_engine builds the ort backend, not {opts.backend!r}.")
    return opts


def _calibration_feeds(
    source: Path,
    header: onnx.ModelProto,
    opts: BuildOptions,
    data: str | os.PathLike[str] | Sequence[str] | None,
    tokenizer: str | os.PathLike[str] | None,
) -> list[dict[str, np.ndarray]]:
    """Static int8: ORT feeds of the calibration texts, read before any work is done."""
    from factorlm._common.text import TextTokenizer, batch_feeds, find_tokenizer
    from factorlm.data import load_texts

    if data is None:
        raise ConfigError(
            "--int8-mode static needs calibration texts: pass --data FILE (the pipeline uses "
            "its calibration split)."
        )
    source_texts = Path(data) if isinstance(data, str | os.PathLike) else list(data)
    texts = load_texts(source_texts, opts.text_column, opts.calibration_samples)
    folder = find_tokenizer(source, explicit=Path(tokenizer) if tokenizer is not None else None)
    batches = batch_feeds(
        model_inputs(header),
        TextTokenizer(folder),
        texts,
        batch_size=8,
        max_length=opts.max_length,
        model_name=str(source),
    )
    feeds = [feed for _, _, feed in batches]
    logger.info("Static int8: %d calibration texts in %d batches", len(texts), len(feeds))
    return feeds


#: Initializer payloads larger than this are dropped from the build's graph header.
_HEADER_PAYLOAD_BYTES = 4096


def _load_header(source: Path) -> onnx.ModelProto:
    """The source's graph with large weight payloads dropped, held for the whole build.

    Why: the header only answers questions about the graph (inputs, ops, shapes, small int
    constants); an inline-weight model would otherwise stay resident next to every later copy.
    """
    full = load_onnx(source)
    for tensor in full.graph.initializer:
        if len(tensor.raw_data) > _HEADER_PAYLOAD_BYTES:
            tensor.ClearField("raw_data")
    # protobuf (upb) frees a message's memory only with the whole message: copy what is left
    header = onnx.ModelProto()
    header.CopyFrom(full)
    del full
    gc.collect()
    return header


def _transformer_step(
    b: _Build, work: Path, *, fp16: bool, fuse_factors: bool, reference: Path | None
) -> None:
    """Transformer fusions through factor pairs (and the reference's fusions), then fp16."""
    assert b.model_type is not None
    b.heads, b.hidden = infer_attention_dims(b.header, b.config)
    b.say(f"transformer fusions ({b.model_type})")
    logger.info(
        "Transformer optimizer: model_type=%s num_heads=%s hidden_size=%s",
        b.model_type, b.heads, b.hidden,
    )  # fmt: skip
    kwargs: dict[str, Any] = {
        "model_type": MODEL_TYPES[b.model_type],
        "num_heads": b.heads,
        "hidden_size": b.hidden,
        "use_gpu": b.use_gpu,
    }
    if reference is not None:
        # First, and released before the model's own pass: holding both optimized models at
        # once would add the reference's whole optimization to the build's peak.
        b.say("optimizing the reference")
        ref = optimize_transformer(reference, **kwargs)
        b.fusions["reference"] = count_fusions(ref.model)
        del ref
        gc.collect()
    opt = optimize_factorized(b.source, fuse_factors=fuse_factors, extra=b.notes, **kwargs)
    b.fusions["optimized"] = count_fusions(opt.model)
    if fp16:
        b.say("fp16")
        opt.convert_float_to_float16(keep_io_types=True, op_block_list=list(FP16_OP_BLOCK_LIST))
    # Counted here, the saved graph's ops need no second load of the whole engine.
    b.saved_counts = count_fusions(opt.model)
    save_optimized(opt, work)
    # The optimizer's fusions and shape-inference helpers refer to each other and keep model
    # copies alive until a collection: free them before the next step allocates.
    del opt
    gc.collect()
    b.optimizer = "transformers"
    b.runtime_level = "ORT_ENABLE_ALL"


def _generic_step(b: _Build, work: Path, *, optimize: bool, fp16: bool) -> None:
    """Generic graph optimization (or a plain copy), then fp16."""
    if optimize:
        b.say("graph optimization")
        ort_optimize(b.source, work, "ORT_ENABLE_EXTENDED", ["CPUExecutionProvider"])
        b.optimizer = "graph"
        b.runtime_level = "ORT_ENABLE_ALL"
    else:
        b.say("copying model")
        save_model(onnx.load(str(b.source)), work)
    if fp16:
        b.say("fp16")
        to_fp16(work)


def _quantize_step(
    b: _Build,
    work: Path,
    opts: BuildOptions,
    feeds: list[dict[str, np.ndarray]] | None,
    *,
    per_channel: bool,
    reduce_range: bool,
) -> None:
    """int8 (dynamic or static) or int4 quantization replacing ``work`` (same file name)."""
    quantized = work.with_name("model.quant.onnx")
    if opts.int4:
        b.say("int4 weight-only quantization")
        b.quant = quantize_int4(
            work,
            quantized,
            block_size=opts.int4_block_size,
            accuracy_level=opts.int4_accuracy_level,
        )
    elif opts.int8_mode == "static":
        b.say("int8 static (QDQ) quantization")
        assert feeds is not None
        b.quant = quantize_static_int8(work, quantized, feeds)
    else:
        b.say("int8 dynamic quantization")
        b.quant = quantize_int8(
            work,
            quantized,
            weight_type=opts.int8_weight_type,
            per_channel=per_channel,
            reduce_range=reduce_range,
        )
    for extra in list(work.parent.iterdir()):
        if extra.name.startswith(work.name):
            extra.unlink()
    os.replace(quantized, work)
    b.saved_counts = None  # the quantized graph is counted from its file


def _fusion_step(b: _Build, work: Path, reference: Path | None) -> None:
    """Count the engine's fusions; with a reference, warn about every fusion it lost."""
    engine_fusions = b.saved_counts if b.saved_counts is not None else count_fusions(work)
    b.fusions["engine"] = engine_fusions
    if reference is not None and "reference" not in b.fusions:
        b.fusions["reference"] = count_fusions(reference)
    if "reference" in b.fusions:
        lost = lost_fusions(b.fusions["reference"], b.fusions.get("optimized", engine_fusions))
        b.notes["lost_fusions"] = lost
        if lost:
            logger.warning(
                "The engine lost fusions the reference model has: %s",
                ", ".join(f"{name} ({n} fewer)" for name, n in lost.items()),
            )


def _ort_format_step(b: _Build, work: Path, *, optimize: bool) -> str:
    """Convert to an ORT-format model and drop everything else from the stage."""
    b.say("ORT format")
    target = work.with_name("model.ort")
    to_ort_format(work, target, "ORT_ENABLE_EXTENDED" if optimize else "ORT_DISABLE_ALL")
    for extra in list(work.parent.iterdir()):
        if extra.name != target.name:
            extra.unlink()
    return target.name


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _describe_data(data: str | os.PathLike[str] | Sequence[str] | None) -> str | None:
    if data is None:
        return None
    if isinstance(data, str | os.PathLike):
        return str(data)
    return f"<{len(data)} texts>"


def _engine_bytes(directory: Path) -> int:
    """The engine file plus its external data (every file whose name starts with ``model.``)."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith("model."))


def _session_settings(runtime_level: str) -> dict[str, Any]:
    return {
        "graph_optimization_level": runtime_level,
        "intra_op_num_threads": 0,
        "inter_op_num_threads": 0,
        "execution_mode": "ORT_SEQUENTIAL",
    }


def _load_check(b: _Build, path: Path) -> Any:
    """Open the built engine as the benchmark will; a failure names the engine file."""
    b.say("checking the engine loads")
    settings = _session_settings(b.runtime_level)
    try:
        return create_session(
            path,
            providers=b.providers,
            graph_optimization_level=settings["graph_optimization_level"],
            intra_op_num_threads=settings["intra_op_num_threads"],
            inter_op_num_threads=settings["inter_op_num_threads"],
        )
    except ModelLoadError as exc:
        raise FactorlmError(
            f"The built engine {path.name} does not load in ONNX Runtime: {exc}"
        ) from exc


def build_ort_engine(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: BuildOptions | None = None,
    *,
    data: str | os.PathLike[str] | Sequence[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    reference: str | os.PathLike[str] | Mapping[str, int] | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    int8_per_channel: bool = True,
    int8_reduce_range: bool = False,
    **overrides: Any,
) -> EngineManifest:
    """Build an ONNX Runtime engine directory from ``model`` and return its manifest.

    ``options`` (default ``BuildOptions()``, backend ort) are validated once; keyword
    ``overrides`` replace single fields, e.g. ``build_ort_engine(m, out, int8=True)``.
    ``options.model_type`` is ``bert``, ``gpt2``, ``llama``, ``none`` (plain graph optimization)
    or None/``auto`` (detect from config.json next to the model, else from the graph).
    ``format="ort"`` writes an ORT-format model for mobile and edge runtimes. A non-empty
    ``out_dir`` is replaced only with ``overwrite``. ``progress`` receives a short label per step.

    Quantization (``manifest.quantization`` reports coverage: which of the graph's weights are
    quantized, factor matrices counted apart, and why each float one was skipped):

    * ``int8`` (``int8_mode="dynamic"``): int8 weights, activations quantized at run time;
    * ``int8`` with ``int8_mode="static"``: QDQ with activations calibrated on ``data`` (a text
      file, or a list of texts; tokenized with the tokenizer next to the model or ``tokenizer``).
      Build with ``optimize=False`` for TensorRT or an NPU: the optimized graph holds ORT
      contrib ops (SkipLayerNormalization, Attention, ...);
    * ``int4``: weight-only int4 (MatMulNBits, ``int4_block_size``, ``int4_accuracy_level``).
      MatMulNBits pads K to whole blocks; for a factor pair ``(x @ L) @ R`` the K of ``R`` is
      the rank, so compress with ``rank_multiple`` equal to the block size (32) to waste nothing.

    ``fuse_factors`` lets the transformer optimizer see through factorlm's factor pairs, so a
    compressed model keeps the Attention (with a joint Q/K/V factorization) and
    EmbedLayerNormalization fusions (``fusions.collapse_factor_pairs``). ``reference`` (the
    original model) is optimized the same way; its fusion counts are recorded and every fusion
    the engine lacks is logged as a warning and listed in ``extra["lost_fusions"]``; a mapping
    instead of a path is the reference's fusion counts from its own build (its manifest's
    ``fusions["optimized"]``), which spares optimizing it a second time (on BERT-base that
    second optimizer run added 2.4 GB to the build's peak). Llama-family
    decoders are optimized as ORT's ``qwen3`` type (RMSNorm and RotaryEmbedding fusions).
    """
    opts = _resolve_options(options, dict(overrides))
    source = Path(model)
    counted = dict(reference) if isinstance(reference, Mapping) else None
    ref = None if reference is None or isinstance(reference, Mapping) else Path(reference)
    header = _load_header(source)
    chosen = resolve_providers(list(opts.providers) or None)
    check_output_dir(source, Path(out_dir), overwrite=overwrite)
    sidecar_paths(source)  # a sidecar symlink leaving the folder is refused before any work
    feeds = None
    if opts.int8 and opts.int8_mode == "static":
        feeds = _calibration_feeds(source, header, opts, data, tokenizer)
    elif data is not None:
        logger.info("Calibration data is used by static int8 only; ignoring it")
    config = read_config(source)
    if opts.model_type in (None, "auto"):
        resolved_type = detect_model_type(header, config)
    else:
        resolved_type = None if opts.model_type == "none" else opts.model_type
    b = _Build(source, header, config, resolved_type, chosen, progress or (lambda _msg: None))
    if counted is not None:
        b.fusions["reference"] = counted
    b.say("hashing source")
    src_info = source_info(source, header)
    b.fusions["source"] = count_fusions(header)

    with staged_directory(out_dir) as tmp:
        work = tmp / "model.onnx"
        engine = work.name
        try:
            if opts.optimize and b.model_type is not None:
                _transformer_step(
                    b, work, fp16=opts.fp16, fuse_factors=opts.fuse_factors, reference=ref
                )
            else:
                _generic_step(b, work, optimize=opts.optimize, fp16=opts.fp16)
            if opts.int8 or opts.int4:
                _quantize_step(
                    b, work, opts, feeds,
                    per_channel=int8_per_channel, reduce_range=int8_reduce_range,
                )  # fmt: skip
            _fusion_step(b, work, ref)
            if opts.format == "ort":
                engine = _ort_format_step(b, work, optimize=opts.optimize)
        except ModelLoadError as exc:
            raise FactorlmError(
                f"ONNX Runtime could not build an engine from {source} ({exc})"
            ) from exc
        except FactorlmError:
            raise
        except Exception as exc:
            raise FactorlmError(
                f"ONNX Runtime could not build an engine from {source}: {type(exc).__name__}: {exc}"
            ) from exc
        sess = _load_check(b, tmp / engine)
        files = copy_sidecars(source, tmp)
        manifest = EngineManifest(
            backend="ort",
            engine=engine,
            source=src_info,
            options={
                **{
                    k: _jsonable(v)
                    for k, v in asdict(opts).items()
                    if k not in BuildOptions._TRT_ONLY
                },
                "optimizer": b.optimizer,
                "num_heads": b.heads,
                "hidden_size": b.hidden,
                "fp16_op_block_list": list(FP16_OP_BLOCK_LIST) if opts.fp16 else [],
                "int8_per_channel": int8_per_channel,
                "int8_reduce_range": int8_reduce_range,
                "reference": (
                    str(ref) if ref is not None else "fusion counts given" if counted else None
                ),
                "data": _describe_data(data),
            },
            versions=versions(),
            providers=chosen,
            session=_session_settings(b.runtime_level),
            fusions=b.fusions,
            sizes={"source_bytes": int(src_info["bytes"]), "engine_bytes": _engine_bytes(tmp)},
            model_type=b.model_type,
            quantization=asdict(b.quant) if b.quant is not None else None,
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
            extra=b.notes,
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
