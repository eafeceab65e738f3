"""Build an ONNX Runtime engine directory: optimize, optionally fp16 or int8, as .onnx or .ort.

An engine directory holds the engine file, the tokenizer/config files found next to the source
model (so a benchmark can tokenize text for it) and ``manifest.json``. Everything is written to
a staged folder that is renamed into place at the end, so a failure never leaves a half-written
engine behind. The build is a short sequence of steps over one :class:`_Build` record: check the
options, optimize (transformer fusions or generic graph optimization, then fp16), quantize,
count fusions, convert to ORT format, check that the engine loads, write the manifest.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    EXTERNAL_DATA_THRESHOLD,
    FP16_OP_BLOCK_LIST,
    optimize_factorized,
    ort_optimize,
    save_model,
    to_fp16,
    to_ort_format,
)
from factorlm.exporters.ort.quantize import QuantizationReport, quantize_int8
from factorlm.exporters.shapes import load_onnx

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

    @property
    def use_gpu(self) -> bool:
        return any(p in self.providers for p in _GPU_PROVIDERS)


def _check_options(
    format: str, fp16: bool, int8: bool, weight_type: str, model_type: str | None
) -> None:
    if format not in ("onnx", "ort"):
        raise ConfigError(f"Unknown engine format {format!r}; choose 'onnx' or 'ort'.")
    if fp16 and int8:
        raise ConfigError("--fp16 and --int8 cannot be combined; choose one precision.")
    if weight_type not in ("int8", "uint8"):
        raise ConfigError(f"Unknown int8 weight type {weight_type!r}; choose 'uint8' or 'int8'.")
    if model_type is not None and model_type not in (*MODEL_TYPES, "none", "auto"):
        choices = ", ".join((*MODEL_TYPES, "none"))
        raise ConfigError(f"Unknown model type {model_type!r}; choose one of {choices}.")


def _transformer_step(
    b: _Build, work: Path, *, fp16: bool, fuse_factors: bool, reference: Path | None
) -> None:
    """Transformer fusions through factor pairs (and the reference's fusions), then fp16."""
    from onnxruntime.transformers.optimizer import optimize_model

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
    opt = optimize_factorized(b.source, fuse_factors=fuse_factors, extra=b.notes, **kwargs)
    b.fusions["optimized"] = count_fusions(opt.model)
    if reference is not None:
        b.say("optimizing the reference")
        ref = optimize_model(str(reference), **kwargs)
        b.fusions["reference"] = count_fusions(ref.model)
        del ref
    if fp16:
        b.say("fp16")
        opt.convert_float_to_float16(keep_io_types=True, op_block_list=list(FP16_OP_BLOCK_LIST))
    opt.save_model_to_file(
        str(work), use_external_data_format=opt.model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    )
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
    b: _Build, work: Path, *, weight_type: str, per_channel: bool, reduce_range: bool
) -> None:
    """Dynamic int8 quantization replacing ``work`` (its external data keeps its recorded name)."""
    b.say("int8 dynamic quantization")
    quantized = work.with_name("model.int8.onnx")
    b.quant = quantize_int8(
        work, quantized, weight_type=weight_type, per_channel=per_channel, reduce_range=reduce_range
    )
    for extra in list(work.parent.iterdir()):
        if extra.name.startswith(work.name):
            extra.unlink()
    os.replace(quantized, work)


def _fusion_step(b: _Build, work: Path, reference: Path | None) -> None:
    """Count the engine's fusions; with a reference, warn about every fusion it lost."""
    engine_fusions = count_fusions(work)
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
    ref = Path(reference) if reference is not None else None
    _check_options(format, fp16, int8, int8_weight_type, model_type)
    header = load_onnx(source)
    chosen = resolve_providers(providers)
    check_output_dir(source, Path(out_dir), overwrite=overwrite)
    sidecar_paths(source)  # a sidecar symlink leaving the folder is refused before any work
    config = read_config(source)
    if model_type in (None, "auto"):
        resolved_type = detect_model_type(header, config)
    else:
        resolved_type = None if model_type == "none" else model_type
    b = _Build(source, header, config, resolved_type, chosen, progress or (lambda _msg: None))
    b.say("hashing source")
    src_info = source_info(source, header)
    b.fusions["source"] = count_fusions(header)

    with staged_directory(out_dir) as tmp:
        work = tmp / "model.onnx"
        engine = work.name
        try:
            if optimize and b.model_type is not None:
                _transformer_step(b, work, fp16=fp16, fuse_factors=fuse_factors, reference=ref)
            else:
                _generic_step(b, work, optimize=optimize, fp16=fp16)
            if int8:
                _quantize_step(
                    b, work, weight_type=int8_weight_type,
                    per_channel=int8_per_channel, reduce_range=int8_reduce_range,
                )  # fmt: skip
            _fusion_step(b, work, ref)
            if format == "ort":
                engine = _ort_format_step(b, work, optimize=optimize)
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
                "optimize": optimize,
                "optimizer": b.optimizer,
                "model_type": model_type,
                "num_heads": b.heads,
                "hidden_size": b.hidden,
                "fp16": fp16,
                "fp16_op_block_list": list(FP16_OP_BLOCK_LIST) if fp16 else [],
                "int8": int8,
                "format": format,
                "fuse_factors": fuse_factors,
                "reference": str(reference) if reference is not None else None,
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
