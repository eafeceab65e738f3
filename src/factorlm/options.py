"""Typed, frozen option objects: the one place where every option's name, default and range live.

The CLI (``factorlm.cli``), the YAML config (``factorlm.pipeline.config``) and the Python API
(``factorlm.compress(...)`` etc.) are all built on these classes, so a flag, a YAML key and a
keyword argument cannot drift apart (``tests/test_options_parity.py`` checks it). Each field
carries its help text and range in ``dataclasses.field(metadata=...)``:

- ``help``: one line for ``--help`` and the JSON schema;
- ``gt``/``ge``/``lt``/``le``: numeric bounds (checked when the value is not None);
- ``choices``: the allowed strings (also the ``Literal`` type of the field);
- ``yaml``: the dotted YAML key when it is not ``<section>.<field>``, or ``None`` when the option
  has no YAML key (``section`` below names each class's YAML section);
- ``cli``: False when the option has no CLI flag.

Objects are validated once, in ``__post_init__``; a bad value raises ``ConfigError`` with one
sentence naming the field and its allowed range. This module imports nothing heavy.
"""

# ruff: noqa: RUF009  (``_opt`` is dataclasses.field with metadata, evaluated once per class)
from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args

from factorlm.errors import ConfigError

__all__ = [
    "ALLOCATIONS",
    "BACKENDS",
    "BENCH_BACKENDS",
    "CLOCKS",
    "DATA_AWARE_METHODS",
    "ENGINE_FORMATS",
    "ERROR_SCALES",
    "FISHER_TASKS",
    "INT8_MODES",
    "INT8_WEIGHT_TYPES",
    "LATENCY_PRECISIONS",
    "LOWRANK_METHODS",
    "METHODS",
    "MODEL_TYPE_CHOICES",
    "OPT_LEVELS",
    "RECOVER_METHODS",
    "REGRESSION_BASES",
    "SHRINKAGES",
    "SPARSE_STRUCTURES",
    "TASKS",
    "Allocation",
    "Backend",
    "BenchBackend",
    "BenchOptions",
    "Blend",
    "BuildOptions",
    "Clock",
    "CompressOptions",
    "EngineFormat",
    "ErrorScale",
    "FisherTask",
    "Int8Mode",
    "Int8WeightType",
    "LatencyPrecision",
    "Method",
    "OptLevel",
    "RecoverMethod",
    "RecoverOptions",
    "RegressionBasis",
    "Shrinkage",
    "SparseStructure",
    "Task",
    "option_fields",
    "replace",
]

logger = logging.getLogger(__name__)

# --- enumerations: the Literal type and its tuple of values ------------------------------------

Method = Literal["svd", "whiten", "drone", "asvd", "fwsvd", "kron", "losparse"]
METHODS: tuple[str, ...] = get_args(Method)
#: The plain low-rank methods (``factorlm.decompose.methods.METHODS`` holds the same five).
LOWRANK_METHODS: tuple[str, ...] = ("svd", "whiten", "drone", "asvd", "fwsvd")
#: THE data-aware methods: method -> the calibration statistic it needs (CalibrationStats field).
#: ``fisher`` comes from the PyTorch model's gradients (labels or the causal-LM loss), the others
#: from ONNX Runtime activation capture.
DATA_AWARE_METHODS: Mapping[str, str] = {
    "whiten": "gram",
    "drone": "gram",
    "asvd": "mean_abs",
    "fwsvd": "fisher",
}
Allocation = Literal["optimal", "lagrangian", "greedy", "uniform"]
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
Shrinkage = Literal["none", "auto"]
SHRINKAGES: tuple[str, ...] = get_args(Shrinkage)
Blend = Literal["none", "auto"]
BLENDS: tuple[str, ...] = get_args(Blend)
ErrorScale = Literal["relative", "absolute"]
ERROR_SCALES: tuple[str, ...] = get_args(ErrorScale)
SparseStructure = Literal["column", "unstructured", "2:4"]
SPARSE_STRUCTURES: tuple[str, ...] = get_args(SparseStructure)
FisherTask = Literal["auto", "classification", "lm", "embedding"]
FISHER_TASKS: tuple[str, ...] = get_args(FisherTask)
Backend = Literal["ort", "tensorrt"]
BACKENDS: tuple[str, ...] = get_args(Backend)
BenchBackend = Literal["auto", "ort", "tensorrt"]
BENCH_BACKENDS: tuple[str, ...] = get_args(BenchBackend)
EngineFormat = Literal["onnx", "ort"]
ENGINE_FORMATS: tuple[str, ...] = get_args(EngineFormat)
Int8WeightType = Literal["uint8", "int8"]
INT8_WEIGHT_TYPES: tuple[str, ...] = get_args(Int8WeightType)
Int8Mode = Literal["dynamic", "static"]
INT8_MODES: tuple[str, ...] = get_args(Int8Mode)
Task = Literal["auto", "classification", "perplexity", "similarity", "generation", "none"]
TASKS: tuple[str, ...] = get_args(Task)
OptLevel = Literal["disable", "basic", "extended", "layout", "all"]
OPT_LEVELS: tuple[str, ...] = get_args(OptLevel)
RegressionBasis = Literal["reference", "absolute"]
REGRESSION_BASES: tuple[str, ...] = get_args(RegressionBasis)
RecoverMethod = Literal["distill", "losparse", "dsee", "kron-kd", "safe"]
RECOVER_METHODS: tuple[str, ...] = get_args(RecoverMethod)
Clock = Literal["wall", "cpu"]
CLOCKS: tuple[str, ...] = get_args(Clock)
LatencyPrecision = Literal["fp32", "int8"]
LATENCY_PRECISIONS: tuple[str, ...] = get_args(LatencyPrecision)

#: ``BuildOptions.model_type`` values (``auto`` = detect, like None).
MODEL_TYPE_CHOICES: tuple[str, ...] = ("auto", "bert", "gpt2", "llama", "none")

_SHAPE = re.compile(r"^[1-9][0-9]*x[1-9][0-9]*$")


def _opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = dataclasses.MISSING,
    **meta: Any,
) -> Any:
    """A dataclass field whose metadata holds its help text, range, choices and YAML/CLI names."""
    metadata = {"help": help, **meta}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _range_text(meta: Mapping[str, Any]) -> str:
    low = f"> {meta['gt']}" if "gt" in meta else f">= {meta['ge']}" if "ge" in meta else ""
    high = f"< {meta['lt']}" if "lt" in meta else f"<= {meta['le']}" if "le" in meta else ""
    return " and ".join(part for part in (low, high) if part)


def _check_field(owner: str, name: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Raise ConfigError when ``value`` is outside the field's choices or bounds."""
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{owner} option '{name}' is {value!r}; choose one of {', '.join(map(str, choices))}."
        )
    if any(k in meta for k in ("gt", "ge", "lt", "le")):
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ConfigError(f"{owner} option '{name}' must be a number, not {value!r}.")
        ok = (
            ("gt" not in meta or value > meta["gt"])
            and ("ge" not in meta or value >= meta["ge"])
            and ("lt" not in meta or value < meta["lt"])
            and ("le" not in meta or value <= meta["le"])
        )
        if not ok:
            raise ConfigError(
                f"{owner} option '{name}' is {value!r}; it must be {_range_text(meta)}."
            )


class _Options:
    """Shared validation: choices and bounds from field metadata, then the class's own checks."""

    #: The YAML section that holds this class's keys by default.
    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        owner = type(self).section or type(self).__name__
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, list):  # keep the object hashable and truly frozen
                object.__setattr__(self, f.name, tuple(value))
            elif isinstance(value, str) and f.type in ("Path | None", "Path"):
                object.__setattr__(self, f.name, Path(value))
            _check_field(owner, f.name, value, f.metadata)
        self._check()

    def _check(self) -> None:
        """Checks that involve more than one field (overridden by subclasses)."""


_T = TypeVar("_T", bound=_Options)


def replace(options: _T, **changes: Any) -> _T:
    """``dataclasses.replace`` with a one-sentence error for an unknown option name."""
    names = {f.name for f in dataclasses.fields(options)}  # type: ignore[arg-type]
    unknown = sorted(set(changes) - names)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{type(options).__name__} has no option '{unknown[0]}'{hint}")
    return dataclasses.replace(options, **changes)  # type: ignore[type-var]


def option_fields(cls: type[_Options]) -> list[dataclasses.Field[Any]]:
    """The fields of an options class (for the CLI, the YAML config and the parity test)."""
    return list(dataclasses.fields(cls))  # type: ignore[arg-type]


@dataclass(frozen=True)
class CompressOptions(_Options):
    """How ``compress`` plans and factorizes: method, budget, targets and calibration."""

    section: ClassVar[str] = "compress"

    method: Method = _opt(
        "whiten",
        "Factorization method; whiten, drone, asvd and fwsvd need calibration data.",
        choices=METHODS,
    )
    ratio: float = _opt(
        0.6, "Fraction of the targeted linear parameters kept (0 < ratio < 1).", gt=0.0, lt=1.0
    )
    energy: float | None = _opt(
        None, "Keep this share of each weight's spectral energy instead of a ratio.", gt=0.0, le=1.0
    )
    rank_multiple: int = _opt(8, "Round every rank to this multiple.", ge=1)
    allocation: Allocation = _opt(
        "optimal", "How the ratio is spread over the weights.", choices=ALLOCATIONS
    )
    error_scale: ErrorScale = _opt(
        "relative",
        "Whether the allocation weighs each weight's error relative to its norm or absolute.",
        choices=ERROR_SCALES,
    )
    min_fraction: float = _opt(
        0.5,
        "No factorized weight below this fraction of its break-even rank (lowered if needed).",
        ge=0.0,
        le=1.0,
    )
    include: str | None = _opt(None, "Regex on initializer or node names to target.")
    exclude: str | None = _opt(None, "Regex on initializer or node names to skip.")
    embeddings: float | None = _opt(
        None, "Parameter ratio for the token embeddings (unset: left dense).", gt=0.0, lt=1.0
    )
    min_size: int = _opt(4096, "Smallest matrix (elements) worth factorizing.", ge=0)
    joint_qkv: bool = _opt(
        True, "Q/K/V share one down-projection so ONNX Runtime keeps its Attention fusion."
    )
    plan: Path | None = _opt(None, "Apply this (edited) plan JSON instead of planning.")
    sparse_structure: SparseStructure = _opt(
        "column", "losparse: structure of the sparse part.", choices=SPARSE_STRUCTURES
    )
    sparse_density: float = _opt(
        0.05, "losparse: density of the sparse part (below ratio).", ge=0.0, lt=1.0
    )
    external_data: bool = _opt(
        False,
        "Write the weights to OUT.onnx.data (always done above 2 GB or when the input keeps "
        "its weights in external data).",
        yaml=None,
    )
    calibration_samples: int = _opt(
        256, "Calibration texts used for the statistics.", ge=1, yaml="data.calibration_samples"
    )
    max_length: int = _opt(128, "Tokens per calibration text.", ge=8, yaml="calibration.max_length")
    batch_size: int = _opt(16, "Calibration batch size.", ge=1, yaml="calibration.batch_size")
    text_column: str = _opt("text", "Text column of the data file.", yaml="data.text_column")
    label_column: str | None = _opt(
        "label",
        "Label column of the data file (fwsvd's Fisher on a classifier).",
        yaml="data.label_column",
    )
    fisher_task: FisherTask = _opt(
        "auto",
        "fwsvd and loss_aware: the loss whose gradients give the Fisher (auto: next-token loss "
        "for a causal LM, the labels for a classifier; for an encoder without a head the labelled "
        "probe (fwsvd) or embedding (loss_aware): the pooled embedding's sensitivity, no labels).",
        choices=FISHER_TASKS,
        yaml="calibration.fisher_task",
    )
    fisher_samples: int | None = _opt(
        None,
        "Calibration texts for the gradient statistics (fwsvd's Fisher, loss_aware's output "
        "Fisher or Gram): one backward pass each, so fewer than the Grams' texts may do; null: "
        "all calibration texts (the first ones are used).",
        ge=1,
        yaml="calibration.fisher_samples",
    )
    sequential: bool = _opt(
        False,
        "Refit the whitened weights block by block to the inputs of the partially compressed "
        "model while matching the original outputs (error-correcting calibration; whiten/drone).",
        yaml="calibration.sequential",
    )
    sequential_blocks: int = _opt(
        4,
        "Sequential: groups of layers refit in turn (each runs both models over the data).",
        ge=1,
        yaml="calibration.sequential_blocks",
    )
    sequential_ridge: float = _opt(
        0.01,
        "Sequential: ridge of the corrected target, relative to the mean input energy (without "
        "one the least-squares correction can blow up).",
        ge=0.0,
        le=1.0,
        yaml="calibration.sequential_ridge",
    )
    generated_samples: int = _opt(
        0,
        "Add this many texts sampled by the model itself (causal LMs, from its start token; needs "
        "the PyTorch weights) to the calibration data: generic text that broadens a narrow set.",
        ge=0,
        yaml="calibration.generated_samples",
    )
    shrinkage: Shrinkage = _opt(
        "none",
        "Shrink each calibration Gram toward its diagonal (auto: by the likelihood of held-back "
        "batches; guards against over-fitting a small or narrow calibration set).",
        choices=SHRINKAGES,
        yaml="calibration.shrinkage",
    )
    blend: Blend = _opt(
        "none",
        "Blend each calibration Gram with its Gram on generic text (factorlm's mixed-genre set: "
        "three Austen novels and review snippets; collected once per model), and with "
        "loss_aware the output Fisher with its generic one at the same weight. auto: the weight "
        "per Gram by the likelihood of held-back batches of the calibration data.",
        choices=BLENDS,
        yaml="calibration.blend",
    )
    blend_weight: float | None = _opt(
        None,
        "Blend with the generic-text Gram at this fixed weight (0 = the calibration data's own "
        "Gram, 1 = the generic one) instead of choosing it by held-back likelihood.",
        ge=0.0,
        le=1.0,
        yaml="calibration.blend_weight",
    )
    loss_aware: bool = _opt(
        False,
        "Weight each output feature by the loss's output Fisher (next-token loss for a causal "
        "LM; needs the PyTorch weights) and allocate ranks by the estimated loss increase "
        "(absolute errors in loss units; error_scale is then not used).",
        yaml="calibration.loss_aware",
    )
    output_gram: bool = _opt(
        False,
        "Loss-aware: weight the outputs by the full output-gradient Gram (out x out per weight) "
        "instead of its diagonal; better factors, about twice the collection time and 8*out^2 "
        "bytes per weight.",
        yaml="calibration.output_gram",
    )
    ray_address: str | None = _opt(
        None,
        "Gather the calibration Grams and run the per-weight factorizations as Ray tasks: "
        "'auto' joins RAY_ADDRESS or starts a local Ray, 'local' starts one, else a cluster "
        "address (pip install 'factorlm[ray]').",
        flag_value="auto",
    )
    target_speedup: float | None = _opt(
        None,
        "Plan ranks for this whole-model speedup predicted from latency measured on the engine "
        "(> 1; replaces ratio).",
        gt=1.0,
    )
    target_latency_ms: float | None = _opt(
        None,
        "Plan ranks for this predicted whole-model latency in ms (replaces ratio).",
        gt=0.0,
    )
    latency_shape: str = _opt(
        "1x128",
        "Latency target: BATCHxSEQUENCE the model is timed at (Bx1 with latency_past: one decode "
        "step).",
    )
    latency_past: int = _opt(
        0,
        "Latency target, decoders with a KV cache: time one decode step against this many "
        "cached positions (needs latency_shape BATCHx1; 0: a prefill of the shape).",
        ge=0,
    )
    latency_precision: LatencyPrecision = _opt(
        "fp32",
        "Latency target: engine precision timed (int8: dynamic, as build --int8).",
        choices=LATENCY_PRECISIONS,
    )
    latency_threads: int = _opt(
        0, "Latency target: ONNX Runtime intra-op threads; 0: ORT's default.", ge=0
    )
    latency_optimize: bool = _opt(
        True, "Latency target: time the optimized engine (graph and transformer fusions)."
    )
    latency_budget_s: float = _opt(
        120.0,
        "Latency target: at most this many seconds measuring (cached results are free).",
        gt=0.0,
    )

    def _check(self) -> None:
        if self.target_speedup is not None and self.target_latency_ms is not None:
            raise ConfigError(
                "compress options 'target_speedup' and 'target_latency_ms' are alternatives; "
                "set only one."
            )
        if not _SHAPE.match(self.latency_shape.lower()):
            raise ConfigError(
                f"compress option 'latency_shape' is {self.latency_shape!r}; use BATCHxSEQUENCE, e.g. 1x128."
            )
        if self.latency_target:
            if self.latency_past and not self.latency_shape.lower().endswith("x1"):
                raise ConfigError(
                    f"compress option 'latency_past' times a decode step: set latency_shape to "
                    f"BATCHx1, not {self.latency_shape!r}."
                )
            for name in ("energy", "embeddings", "plan"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"compress option '{name}' cannot be combined with a latency target "
                        "(the target chooses the ranks)."
                    )
        if self.method == "losparse" and not self.sparse_density < self.ratio:
            raise ConfigError(
                f"compress option 'sparse_density' is {self.sparse_density!r}; "
                f"it must be below ratio {self.ratio!r}."
            )
        if (self.sequential or self.loss_aware) and self.method not in ("whiten", "drone"):
            flag = "sequential" if self.sequential else "loss_aware"
            raise ConfigError(
                f"compress option '{flag}' refines the whitened factorization; use method whiten "
                f"or drone, not {self.method!r}."
            )
        if self.output_gram and not self.loss_aware:
            raise ConfigError("compress option 'output_gram' refines 'loss_aware'; set both.")
        if self.sequential and self.ray_address is not None:
            raise ConfigError(
                "compress options 'sequential' and 'ray_address' cannot be combined: each block "
                "needs the previous one's factors."
            )
        if self.blend == "auto" and self.blend_weight is not None:
            raise ConfigError(
                "compress options 'blend' auto and 'blend_weight' exclude each other: auto "
                "chooses the weight, blend_weight fixes it."
            )
        if self.blending and self.shrinkage != "none":
            raise ConfigError(
                "compress options 'blend' and 'shrinkage' exclude each other: both pull a narrow "
                "calibration Gram toward something broader; choose one."
            )
        if self.blending and self.method not in ("whiten", "drone"):
            raise ConfigError(
                f"compress option 'blend' blends whitening Grams; method '{self.method}' uses "
                "none (use whiten or drone)."
            )
        for name in ("include", "exclude"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(
                        f"compress option '{name}' is not a valid regular expression ({exc})."
                    ) from None

    @property
    def blending(self) -> bool:
        """Whether the Grams are blended with generic text's (``blend`` auto or a fixed weight)."""
        return self.blend == "auto" or self.blend_weight is not None

    @property
    def latency_target(self) -> bool:
        """Whether ranks are planned for a latency (then ``ratio`` is ignored)."""
        return self.target_speedup is not None or self.target_latency_ms is not None

    @property
    def needs_statistics(self) -> str | None:
        """The calibration statistic the method needs (None: data-free or a given plan)."""
        return DATA_AWARE_METHODS.get(self.method) if self.plan is None else None


@dataclass(frozen=True)
class BuildOptions(_Options):
    """How ``build`` turns an ONNX model into an engine folder (ONNX Runtime or TensorRT)."""

    section: ClassVar[str] = "build"
    #: Options that only one backend understands, with the value that means "not set".
    _ORT_ONLY: ClassVar[dict[str, Any]] = {
        "optimize": True,
        "model_type": None,
        "format": "onnx",
        "providers": (),
        "int8_weight_type": "uint8",
        "int8_mode": "dynamic",
        "int4": False,
        "int4_block_size": 32,
        "int4_accuracy_level": 4,
        "fuse_factors": True,
    }
    _TRT_ONLY: ClassVar[dict[str, Any]] = {
        "bf16": False,
        "shapes": (),
        "calibration": None,
        "sparse": False,
        "timing_cache": True,
        "workspace_gib": None,
    }

    backend: Backend = _opt("ort", "Engine backend.", choices=BACKENDS)
    optimize: bool = _opt(True, "ORT: graph and transformer fusions.")
    int8: bool = _opt(
        False, "ORT: int8 quantization (see int8_mode); TensorRT: Q/DQ or a calibration file."
    )
    int8_mode: Int8Mode = _opt(
        "dynamic",
        "ORT int8: dynamic (weights only, activations at run time) or static (QDQ, activations "
        "calibrated on the data; the format NPUs and TensorRT consume).",
        choices=INT8_MODES,
    )
    int4: bool = _opt(
        False, "ORT: int4 weight-only quantization (MatMulNBits) of every constant MatMul weight."
    )
    int4_block_size: int = _opt(
        32, "ORT int4: weights per quantization block along K (a power of 2).", ge=16, le=256
    )
    int4_accuracy_level: int = _opt(
        4,
        "ORT int4: MatMulNBits compute accuracy (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8).",
        ge=0,
        le=4,
    )
    fp16: bool = _opt(False, "Half precision (ORT or TensorRT).")
    format: EngineFormat = _opt(
        "onnx", "ORT: engine file format (ort: edge).", choices=ENGINE_FORMATS
    )
    providers: tuple[str, ...] = _opt(
        factory=tuple,
        help="ORT: execution providers in order, e.g. cuda,cpu (default cpu).",
        yaml=None,
    )
    model_type: str | None = _opt(
        None, "ORT: bert | gpt2 | llama | none (default: detect).", yaml=None
    )
    int8_weight_type: Int8WeightType = _opt(
        "uint8",
        "ORT int8: weight type (uint8 is safe on AVX2).",
        choices=INT8_WEIGHT_TYPES,
        yaml=None,
    )
    fuse_factors: bool = _opt(True, "ORT: keep Attention fusions for factorized Q/K/V.", yaml=None)
    bf16: bool = _opt(False, "TensorRT: allow bfloat16 kernels.", yaml=None)
    shapes: tuple[str, ...] = _opt(
        factory=tuple,
        help="TensorRT: optimization profiles name:min,opt,max, e.g. input_ids:1x16,8x128,32x512.",
        yaml=None,
    )
    calibration: Path | None = _opt(
        None, "TensorRT: .npz of input arrays for INT8 calibration.", yaml=None
    )
    sparse: bool = _opt(False, "TensorRT: use 2:4 sparse weights.", yaml=None)
    timing_cache: bool = _opt(
        True, "TensorRT: reuse a timing cache in the cache folder.", yaml=None
    )
    workspace_gib: float | None = _opt(
        None, "TensorRT: workspace memory limit in GiB.", gt=0.0, yaml=None
    )
    calibration_samples: int = _opt(
        256,
        "ORT static int8: calibration texts from the data.",
        ge=1,
        yaml="data.calibration_samples",
    )
    max_length: int = _opt(
        128, "ORT static int8: tokens per calibration text.", ge=8, yaml="calibration.max_length"
    )
    text_column: str = _opt(
        "text", "ORT static int8: text column of the data file.", yaml="data.text_column"
    )

    def _check(self) -> None:
        if self.int8_mode != "dynamic" and not self.int8:
            raise ConfigError(
                f"build option 'int8_mode' is {self.int8_mode!r} but int8 is off; "
                "add --int8 (YAML: build.int8: true)."
            )
        if self.int4 and self.int8:
            raise ConfigError("--int4 and --int8 cannot be combined; choose one quantization.")
        if self.backend == "ort" and self.fp16 and self.int8:
            raise ConfigError("--fp16 and --int8 cannot be combined; choose one precision.")
        if self.int4_block_size & (self.int4_block_size - 1):
            raise ConfigError(
                f"build option 'int4_block_size' is {self.int4_block_size}; MatMulNBits needs "
                "a power of 2 from 16 to 256."
            )
        if self.model_type not in (None, *MODEL_TYPE_CHOICES):
            raise ConfigError(
                f"Unknown model type {self.model_type!r}; choose one of "
                f"{', '.join(MODEL_TYPE_CHOICES)}."
            )
        other, unset = (
            ("tensorrt", self._TRT_ONLY) if self.backend == "ort" else ("ort", self._ORT_ONLY)
        )
        for name, default in unset.items():
            if getattr(self, name) != default:
                raise ConfigError(
                    f"build option '{name}' applies to the {other} backend only, "
                    f"not to {self.backend}."
                )


@dataclass(frozen=True)
class BenchOptions(_Options):
    """How ``benchmark`` measures latency, fidelity and a task, and which goals gate it."""

    section: ClassVar[str] = "benchmark"

    shapes: tuple[str, ...] = _opt(
        factory=tuple,
        help="BATCHxSEQUENCE grid points, e.g. 1x128 8x128; empty: batch 1 and 8 at sequence "
        "128 where the model's axes are free.",
    )
    task: Task = _opt(
        "auto",
        "Task metric (auto: classification with a label column, perplexity without, none "
        "without data).",
        choices=TASKS,
    )
    warmup: int = _opt(5, "Warm-up rounds per shape.", ge=0)
    iterations: int = _opt(30, "Alternating timed rounds per shape.", ge=3)
    seed: int = _opt(0, "Seed of inputs, data sampling and bootstrap.", yaml=None)
    confidence: float = _opt(
        0.95, "Confidence level of the intervals.", ge=0.5, lt=1.0, yaml=None, cli=False
    )
    backend: BenchBackend = _opt(
        "auto", "Runner backend (auto: from the engine folder).", choices=BENCH_BACKENDS, yaml=None
    )
    providers: tuple[str, ...] = _opt(
        factory=tuple, help="ONNX Runtime execution providers in order (default cpu).", yaml=None
    )
    threads: int = _opt(0, "ONNX Runtime intra-op threads; 0: ORT's default.", ge=0, yaml=None)
    graph_optimization_level: OptLevel = _opt(
        "all", "ONNX Runtime graph optimization level.", choices=OPT_LEVELS, yaml=None
    )
    tokenizer: Path | None = _opt(
        None, "Tokenizer folder (default: the model's folder).", yaml=None
    )
    text_column: str = _opt("text", "Text column of the data file.", yaml=None)
    label_column: str | None = _opt("label", "Label column of the data file.", yaml=None)
    labels: tuple[str, ...] | None = _opt(None, "Keep only rows with these labels.", yaml=None)
    max_samples: int | None = _opt(
        2000, "Rows sampled (seeded) from the data; unset: all.", ge=1, yaml=None
    )
    skip_rows: int = _opt(0, "Skip the data file's first rows.", ge=0, yaml=None)
    max_length: int = _opt(128, "Tokens per text.", ge=1, yaml=None)
    batch_size: int = _opt(32, "Texts per inference batch.", ge=1, yaml=None, cli=False)
    folds: int = _opt(
        5, "Classification: cross-fitting folds of the linear probe.", ge=2, yaml=None, cli=False
    )
    bootstrap_resamples: int = _opt(
        2000, "Paired bootstrap resamples of the accuracy drop.", ge=100, yaml=None, cli=False
    )
    window: int = _opt(512, "Perplexity window in tokens.", ge=2, yaml=None)
    stride: int | None = _opt(None, "Perplexity stride (default: the window).", ge=1, yaml=None)
    max_windows: int | None = _opt(8, "Perplexity windows scored; unset: all.", ge=1, yaml=None)
    prefill_lengths: tuple[int, ...] = _opt(
        factory=lambda: (128, 512),
        help="Decoders with a KV cache: prompt lengths of the prefill latency points (batch 1).",
    )
    decode_past: tuple[int, ...] = _opt(
        factory=lambda: (128, 512, 1024),
        help="Decoders with a KV cache: past lengths of the one-token decode-step latency points.",
    )
    decode_batches: tuple[int, ...] = _opt(
        factory=lambda: (1, 4), help="Decoders with a KV cache: batch sizes of the decode steps."
    )
    max_new_tokens: int = _opt(32, "Generation task: greedy tokens generated per prompt.", ge=1)
    generation_prompts: int = _opt(
        8, "Generation task: prompts taken from the first rows of the data file.", ge=1
    )
    goals_file: Path | None = _opt(None, "YAML file of goals.", yaml=None)
    max_accuracy_drop: float | None = _opt(
        None,
        "Goal: largest accuracy drop in points (perplexity: percent).",
        ge=0.0,
        yaml="benchmark.goals.max_accuracy_drop",
    )
    min_speedup: float | None = _opt(
        None, "Goal: smallest median speedup, e.g. 1.5.", gt=0.0, yaml="benchmark.goals.min_speedup"
    )
    max_fidelity_loss: float | None = _opt(
        None,
        "Goal: largest 1 - cosine on any output.",
        ge=0.0,
        le=2.0,
        yaml="benchmark.goals.max_fidelity_loss",
    )
    baseline: Path | None = _opt(None, "Stored report.json to gate latency regressions against.")
    max_regression: float | None = _opt(
        None, "Allowed latency regression vs the baseline in percent (default 5).", ge=0.0
    )
    regression_basis: RegressionBasis = _opt(
        "reference",
        "reference: the candidate/reference ratio; absolute: milliseconds.",
        choices=REGRESSION_BASES,
        yaml=None,
    )

    def _check(self) -> None:
        for shape in self.shapes:
            if not _SHAPE.match(str(shape).lower()):
                raise ConfigError(
                    f"benchmark option 'shapes' has {shape!r}; write BATCHxSEQUENCE, e.g. 8x128."
                )
        for name in ("prefill_lengths", "decode_past", "decode_batches"):
            object.__setattr__(self, name, _positive_ints(name, getattr(self, name)))


def _positive_ints(name: str, values: Any) -> tuple[int, ...]:
    """A tuple of positive ints from ints or digit strings (CLI flags give strings)."""
    items = [values] if isinstance(values, int | str) else list(values or ())
    out: list[int] = []
    for item in items:
        parts = item.split(",") if isinstance(item, str) else [item]
        for part in parts:
            text = str(part).strip()
            if isinstance(part, bool) or not text.isdigit() or int(text) < 1:
                raise ConfigError(
                    f"benchmark option '{name}' has {part!r}; give positive whole numbers, "
                    "e.g. 128,512."
                )
            if int(text) not in out:
                out.append(int(text))
    return tuple(out)


@dataclass(frozen=True)
class RecoverOptions(_Options):
    """How ``recover`` distils the factorized PyTorch model back towards the original."""

    section: ClassVar[str] = "recover"

    method: RecoverMethod = _opt(
        "distill",
        "Recovery method (YAML: unset skips recovery).",
        choices=RECOVER_METHODS,
        yaml_optional=True,
    )
    steps: int = _opt(300, "Training steps: the schedule's horizon (warm-up, phases, decay).", ge=1)
    time_budget_s: float | None = _opt(
        None, "A hard cap on training seconds; may stop before 'steps'.", gt=0.0
    )
    clock: Clock = _opt(
        "wall", "What time_budget_s counts: elapsed or process CPU seconds.", choices=CLOCKS
    )
    lr: float = _opt(1e-4, "Peak learning rate (AdamW).", gt=0.0)
    feature_fraction: float = _opt(
        0.5, "Share of steps in feature distillation, then output distillation.", ge=0.0, le=1.0
    )
    temperature: float = _opt(2.0, "Temperature of the logit KL.", gt=0.0)
    lm_weight: float = _opt(0.0, "Causal LM only: weight of the next-token loss.", ge=0.0)
    batch_size: int = _opt(16, "Texts per step.", ge=1)
    max_samples: int | None = _opt(None, "Use at most this many distillation texts.", ge=1)
    seed: int = _opt(0, "Seed of data order and initialisation.")
    max_length: int = _opt(128, "Tokens per text.", ge=8, yaml="calibration.max_length")
    calibration_samples: int = _opt(
        256,
        "Texts for the statistics of a data-aware plan when none are given.",
        ge=1,
        yaml="data.calibration_samples",
    )
    text_column: str = _opt("text", "Text column of the data file.", yaml="data.text_column")
    checkpoint_every: int = _opt(50, "Steps between checkpoints.", ge=1, yaml=None)
    threads: int | None = _opt(
        None, "PyTorch threads for training (1 is fastest on a busy CPU).", ge=1, yaml=None
    )
