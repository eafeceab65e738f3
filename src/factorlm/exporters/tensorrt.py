"""TensorRT engines (.plan) from ONNX, written against TensorRT 10's Python API.

TensorRT is an optional extra that cannot be installed everywhere, so it is imported lazily and
only by :func:`_build_plan`. Everything else (validating the model, deriving optimization
profiles from ``--shapes`` and the model's dynamic axes, choosing builder flags, reading a
calibration set, the manifest) is plain Python, runs and is tested without TensorRT, and runs
*before* TensorRT is needed, so a user mistake is reported in one sentence on any machine.

The build follows the documented TensorRT 10 flow::

    builder = trt.Builder(logger)
    network = builder.create_network(0)            # explicit batch is the only mode in TRT 10
    parser = trt.OnnxParser(network, logger); parser.parse_from_file(path)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile(); profile.set_shape(name, min, opt, max)
    config.add_optimization_profile(profile); config.set_flag(trt.BuilderFlag.FP16) ...
    cache = config.create_timing_cache(blob); config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)

INT8 comes either from explicit Q/DQ nodes in the graph (the modern route) or, for a graph
without them, from a calibration set (``.npz`` of input arrays) through the legacy entropy
calibrator, which TensorRT 10.1+ still accepts but deprecates.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from factorlm._common.files import (
    cache_root,
    copy_sidecars,
    staged_directory,
    versions,
    write_bytes_atomic,
)
from factorlm.errors import BackendUnavailableError, ConfigError, DataError, FactorlmError
from factorlm.exporters.fusions import count_fusions
from factorlm.exporters.ort.manifest import EngineManifest, check_output_dir, source_info
from factorlm.exporters.shapes import (
    ModelInput,
    ShapeRange,
    derive_shapes,
    load_onnx,
    model_inputs,
    parse_shapes,
)

__all__ = [
    "TENSORRT_MISSING",
    "TrtBuildPlan",
    "build_trt_engine",
    "builder_flags",
    "default_timing_cache",
    "has_explicit_quantization",
    "import_tensorrt",
    "load_calibration",
    "plan_trt_build",
]

logger = logging.getLogger(__name__)

TENSORRT_MISSING = (
    "TensorRT is not installed; install the extra with `pip install factorlm[tensorrt]`."
)

_NP_TO_ONNX = {
    np.dtype("float32"): onnx.TensorProto.FLOAT,
    np.dtype("float16"): onnx.TensorProto.FLOAT16,
    np.dtype("int64"): onnx.TensorProto.INT64,
    np.dtype("int32"): onnx.TensorProto.INT32,
    np.dtype("bool"): onnx.TensorProto.BOOL,
}


def import_tensorrt() -> ModuleType:
    """Import ``tensorrt`` or raise ``BackendUnavailableError`` with the extra to install."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(TENSORRT_MISSING) from exc
    return tensorrt


def has_explicit_quantization(model: onnx.ModelProto) -> bool:
    """True when the graph carries Q/DQ pairs, i.e. TensorRT can build INT8 without calibration."""
    ops = {node.op_type for node in model.graph.node}
    return {"QuantizeLinear", "DequantizeLinear"} <= ops


def builder_flags(
    *,
    fp16: bool = False,
    bf16: bool = False,
    int8: bool = False,
    sparse: bool = False,
    explicit_quantization: bool = False,
    calibration: bool = False,
) -> list[str]:
    """Names of the ``trt.BuilderFlag`` members to set, or ``ConfigError`` for an impossible mix.

    INT8 needs either Q/DQ nodes in the graph or a calibration set; Q/DQ graphs already say
    where to quantize, so a calibration set with them is a mistake rather than a hint.
    """
    if calibration and not int8:
        raise ConfigError("A calibration set was given without --int8; add --int8 or drop it.")
    if int8 and explicit_quantization and calibration:
        raise ConfigError(
            "The model already has Q/DQ nodes (explicit INT8); drop the calibration set."
        )
    if int8 and not (explicit_quantization or calibration):
        raise ConfigError(
            "--int8 needs a model with Q/DQ nodes or a calibration set (--calibration FILE.npz)."
        )
    flags = []
    if fp16:
        flags.append("FP16")
    if bf16:
        flags.append("BF16")
    if int8:
        flags.append("INT8")
    if sparse:
        flags.append("SPARSE_WEIGHTS")
    return flags


def load_calibration(
    path: str | os.PathLike[str],
    inputs: Sequence[ModelInput],
    profile: Mapping[str, ShapeRange],
    *,
    batch_size: int = 8,
) -> list[dict[str, np.ndarray]]:
    """Calibration batches from an ``.npz`` holding one array per model input.

    Every array stacks samples on axis 0 (which is the batch axis of the input); batches of
    ``batch_size`` samples are cut along it. Names, ranks, dtypes and shapes are checked
    against the model and the optimization profile here, not deep inside TensorRT.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"Calibration set {p} does not exist.")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"Calibration set {p} is not a readable .npz file ({exc}).") from exc
    by_name = {inp.name: inp for inp in inputs}
    missing = sorted(set(by_name) - set(arrays))
    if missing:
        raise DataError(f"Calibration set {p} lacks an array for input {missing[0]!r}.")
    extra = sorted(set(arrays) - set(by_name))
    if extra:
        raise DataError(f"Calibration set {p} has array {extra[0]!r}, which is not a model input.")
    counts = {name: arr.shape[0] if arr.ndim else 0 for name, arr in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise DataError(f"Calibration arrays in {p} must share a non-empty first axis: {counts}.")
    for name, arr in arrays.items():
        inp = by_name[name]
        expected = _NP_TO_ONNX.get(arr.dtype)
        if expected != inp.elem_type:
            raise DataError(
                f"Calibration array {name!r} in {p} is {arr.dtype}, but the model input is {inp.dtype}."
            )
        if arr.ndim != len(inp.dims):
            raise DataError(
                f"Calibration array {name!r} in {p} has rank {arr.ndim}, the input has rank "
                f"{len(inp.dims)}."
            )
        rng = profile[name]
        for axis in range(1, arr.ndim):
            if not rng.min[axis] <= arr.shape[axis] <= rng.max[axis]:
                raise DataError(
                    f"Calibration array {name!r} has size {arr.shape[axis]} on axis {axis}, "
                    f"outside the profile's {rng.min[axis]}..{rng.max[axis]}."
                )
    # Every batch must fit the profile's batch axis; a short remainder is dropped.
    total = next(iter(counts.values()))
    low = max(profile[n].min[0] for n in arrays)
    high = min(profile[n].max[0] for n in arrays)
    size = min(max(batch_size, low), high, total)
    if size < low:
        raise DataError(
            f"Calibration set {p} has {total} samples, fewer than the profile's minimum batch {low}."
        )
    if total % size:
        logger.info("Dropping the last %s calibration samples (batch size %s)", total % size, size)
    return [
        {name: np.ascontiguousarray(arr[start : start + size]) for name, arr in arrays.items()}
        for start in range(0, total - size + 1, size)
    ]


def default_timing_cache() -> Path:
    """Where builds share their timing cache by default: ``<cache>/tensorrt/timing.cache``."""
    return cache_root() / "tensorrt" / "timing.cache"


@dataclass(frozen=True)
class TrtBuildPlan:
    """Everything a TensorRT build needs, decided and validated without TensorRT."""

    source: Path
    profile: dict[str, ShapeRange]
    flags: tuple[str, ...]
    workspace_bytes: int | None
    timing_cache: Path | None
    optimization_level: int | None
    explicit_quantization: bool
    calibration: Path | None
    calibration_batches: int

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``extra`` section."""
        return {
            "profile": {name: rng.to_json() for name, rng in self.profile.items()},
            "shapes": " ".join(rng.to_spec() for rng in self.profile.values()),
            "flags": list(self.flags),
            "workspace_bytes": self.workspace_bytes,
            "timing_cache": str(self.timing_cache) if self.timing_cache else None,
            "builder_optimization_level": self.optimization_level,
            "int8_source": (
                "explicit Q/DQ"
                if "INT8" in self.flags and self.explicit_quantization
                else "calibration"
                if "INT8" in self.flags
                else None
            ),
            "calibration": str(self.calibration) if self.calibration else None,
            "calibration_batches": self.calibration_batches,
        }


def plan_trt_build(
    model: str | os.PathLike[str],
    *,
    shapes: str | Sequence[str] | Mapping[str, ShapeRange] | None = None,
    fp16: bool = False,
    bf16: bool = False,
    int8: bool = False,
    calibration: str | os.PathLike[str] | None = None,
    sparse: bool = False,
    timing_cache: str | os.PathLike[str] | bool | None = None,
    workspace_gib: float | None = None,
    optimization_level: int | None = None,
) -> tuple[TrtBuildPlan, onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """Validate a TensorRT build request against the model; no TensorRT needed.

    ``timing_cache``: a path, True/None for :func:`default_timing_cache`, False for none.
    Returns the plan, the model header (no weights) and the calibration batches.
    """
    source = Path(model)
    header = load_onnx(source)
    inputs = model_inputs(header)
    given = dict(shapes) if isinstance(shapes, Mapping) else parse_shapes(shapes)
    profile = derive_shapes(inputs, given)
    explicit = has_explicit_quantization(header)
    flags = builder_flags(
        fp16=fp16,
        bf16=bf16,
        int8=int8,
        sparse=sparse,
        explicit_quantization=explicit,
        calibration=calibration is not None,
    )
    batches = load_calibration(calibration, inputs, profile) if calibration is not None else []
    if workspace_gib is not None and not workspace_gib > 0:
        raise ConfigError(f"Workspace must be a positive number of GiB, got {workspace_gib}.")
    if optimization_level is not None and not 0 <= optimization_level <= 5:
        raise ConfigError(
            f"Builder optimization level must be between 0 and 5, got {optimization_level}."
        )
    if timing_cache is False:
        cache = None
    elif timing_cache is None or timing_cache is True:
        cache = default_timing_cache()
    else:
        cache = Path(timing_cache)
        if cache.exists() and not cache.is_file():
            raise ConfigError(f"Timing cache {cache} exists and is not a file.")
    plan = TrtBuildPlan(
        source=source,
        profile=profile,
        flags=tuple(flags),
        workspace_bytes=int(workspace_gib * (1 << 30)) if workspace_gib else None,
        timing_cache=cache,
        optimization_level=optimization_level,
        explicit_quantization=explicit,
        calibration=Path(calibration) if calibration is not None else None,
        calibration_batches=len(batches),
    )
    return plan, header, batches


# --------------------------------------------------------------------------------------------
# The only code that touches TensorRT.


def _make_calibrator(
    trt: ModuleType, batches: list[dict[str, np.ndarray]], cache: Path | None
) -> Any:
    """A legacy entropy calibrator feeding ``batches`` through CUDA memory owned by torch."""
    import torch

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self._batches = iter(batches)
            self._keep: list[Any] = []
            self._size = next(iter(batches[0].values())).shape[0]

        def get_batch_size(self) -> int:
            return int(self._size)

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None
            self._keep = [torch.from_numpy(batch[name]).cuda() for name in names]
            return [int(t.data_ptr()) for t in self._keep]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache is not None and cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            if cache is not None:
                cache.write_bytes(bytes(data))

    return _Calibrator()


def _build_plan(
    trt: ModuleType,
    plan: TrtBuildPlan,
    batches: list[dict[str, np.ndarray]],
    target: Path,
) -> dict[str, Any]:
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(plan.source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FactorlmError(f"TensorRT cannot parse {plan.source}: {errors}")
    config = builder.create_builder_config()
    if plan.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    if plan.optimization_level is not None:
        config.builder_optimization_level = plan.optimization_level
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, rng in plan.profile.items():
        profile.set_shape(name, rng.min, rng.opt, rng.max)
    config.add_optimization_profile(profile)
    if batches:
        calib_cache = target.parent / "calibration.cache"
        config.int8_calibrator = _make_calibrator(trt, batches, calib_cache)
        config.set_calibration_profile(profile)
    cache = None
    if plan.timing_cache is not None:
        blob = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FactorlmError(f"TensorRT failed to build an engine from {plan.source}; see its log.")
    target.write_bytes(bytes(serialized))
    if cache is not None and plan.timing_cache is not None:
        write_bytes_atomic(plan.timing_cache, bytes(config.get_timing_cache().serialize()))
    return {
        "inputs": [network.get_input(i).name for i in range(network.num_inputs)],
        "outputs": [network.get_output(i).name for i in range(network.num_outputs)],
        "device": _device_name(),
    }


def _device_name() -> str:
    try:
        import torch

        return str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "unknown"
    except Exception:  # the name is informational only
        return "unknown"


def build_trt_engine(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    shapes: str | Sequence[str] | Mapping[str, ShapeRange] | None = None,
    fp16: bool = False,
    bf16: bool = False,
    int8: bool = False,
    calibration: str | os.PathLike[str] | None = None,
    sparse: bool = False,
    timing_cache: str | os.PathLike[str] | bool | None = None,
    workspace_gib: float | None = None,
    optimization_level: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> EngineManifest:
    """Build ``model.plan`` plus ``manifest.json`` into ``out_dir`` with TensorRT.

    All validation happens first (see :func:`plan_trt_build`); without TensorRT the call then
    raises ``BackendUnavailableError`` and writes nothing.
    """
    say = progress or (lambda _msg: None)
    plan, header, batches = plan_trt_build(
        model,
        shapes=shapes,
        fp16=fp16,
        bf16=bf16,
        int8=int8,
        calibration=calibration,
        sparse=sparse,
        timing_cache=timing_cache,
        workspace_gib=workspace_gib,
        optimization_level=optimization_level,
    )
    check_output_dir(plan.source, Path(out_dir), overwrite=overwrite)
    trt = import_tensorrt()
    say("hashing source")
    src_info = source_info(plan.source, header)
    with staged_directory(out_dir) as tmp:
        say("building TensorRT engine")
        try:
            built = _build_plan(trt, plan, batches, tmp / "model.plan")
        except FactorlmError:
            raise
        except Exception as exc:
            raise FactorlmError(
                f"TensorRT could not build an engine from {plan.source}: {type(exc).__name__}: {exc}"
            ) from exc
        files = copy_sidecars(plan.source, tmp)
        fusions = count_fusions(header)
        manifest = EngineManifest(
            backend="tensorrt",
            engine="model.plan",
            source=src_info,
            options={
                "fp16": fp16,
                "bf16": bf16,
                "int8": int8,
                "sparse": sparse,
                "calibration": str(calibration) if calibration is not None else None,
                "shapes": {name: rng.to_json() for name, rng in plan.profile.items()},
            },
            versions={**versions(), "tensorrt": str(getattr(trt, "__version__", "unknown"))},
            providers=["TensorRT"],
            session={"device": built["device"]},
            fusions={"source": fusions},
            sizes={
                "source_bytes": int(src_info["bytes"]),
                "engine_bytes": (tmp / "model.plan").stat().st_size,
            },
            inputs=[
                {"name": n, **plan.profile[n].to_json()}
                for n in built["inputs"]
                if n in plan.profile
            ],
            outputs=list(built["outputs"]),
            files=files,
            extra=plan.to_json(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        manifest.save(tmp)
    return EngineManifest.load(out_dir)
