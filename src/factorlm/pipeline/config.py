"""The YAML configuration of ``factorlm run``, validated by pydantic and built on ``factorlm.options``.

Every section mirrors one stage. Names, defaults, ranges, choices and help texts come from the
option classes in ``factorlm.options`` (``_opt`` below reads them), so the CLI, the YAML file
and the Python API share one vocabulary; ``RunConfig.options(CompressOptions)`` turns a config
back into the option object a stage runs with. Unknown keys are errors that name the key and
suggest the closest valid one, because a typo silently ignored would run the wrong job in CI.
``json_schema()`` publishes the schema (docs/config.schema.json) for editors.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from factorlm._common.userfiles import read_yaml
from factorlm.errors import ConfigError
from factorlm.options import (
    Allocation,
    Backend,
    BenchOptions,
    Blend,
    BuildOptions,
    Clock,
    CompressOptions,
    EngineFormat,
    ErrorScale,
    FisherTask,
    Int8Mode,
    LatencyPrecision,
    Method,
    RecoverMethod,
    RecoverOptions,
    Shrinkage,
    SparseStructure,
    Task,
    option_fields,
)

__all__ = [
    "OPTION_CLASSES",
    "BenchmarkConfig",
    "BuildConfig",
    "CalibrationConfig",
    "CompressConfig",
    "DataConfig",
    "ExportConfig",
    "GoalsConfig",
    "RecoverConfig",
    "RunConfig",
    "describe_validation_error",
    "json_schema",
    "json_schema_text",
    "load_config",
    "parse_config",
    "yaml_key",
]

logger = logging.getLogger(__name__)

#: The option classes whose fields the YAML config holds (see ``yaml_key``).
OPTION_CLASSES: tuple[type[Any], ...] = (
    CompressOptions,
    BuildOptions,
    BenchOptions,
    RecoverOptions,
)
_O = TypeVar("_O", CompressOptions, BuildOptions, BenchOptions, RecoverOptions)


def yaml_key(cls: type[Any], name: str) -> str | None:
    """The dotted YAML key of option ``name`` of ``cls`` (None: the option has no YAML key)."""
    meta = next(f.metadata for f in option_fields(cls) if f.name == name)
    if "yaml" in meta:
        return str(meta["yaml"]) if meta["yaml"] is not None else None
    return f"{cls.section}.{name}"


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING
    return f.default_factory()


def _opt(cls: type[Any], name: str, **override: Any) -> Any:
    """A pydantic Field with the default, bounds and help of option ``name`` of ``cls``."""
    f = next(f for f in option_fields(cls) if f.name == name)
    meta = f.metadata
    default = override.pop("default", _default(f))
    bounds = {k: meta[k] for k in ("gt", "ge", "lt", "le") if k in meta}
    description = override.pop("description", meta.get("help") or None)
    if isinstance(default, tuple):  # YAML lists; the options object turns them back into tuples
        items = list(default)
        return Field(default_factory=lambda: list(items), description=description, **bounds)
    return Field(default, description=description, **{**bounds, **override})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Checked(_Section):
    """A section whose values must also pass the cross-field checks of its option class."""

    checked_by: ClassVar[type[Any]]

    @model_validator(mode="after")
    def _check_options(self) -> _Checked:
        _validate(self.checked_by, self.model_dump())
        return self


class ExportConfig(_Section):
    """How the Hugging Face model becomes ONNX (skipped when ``model`` is already an ONNX file)."""

    task: str = "feature-extraction"
    opset: int | None = None
    trust_remote_code: bool = False


class DataConfig(_Section):
    """Labelled texts, split once into disjoint calibration and evaluation sets."""

    path: Path | None = Field(None, description="JSONL/CSV/TXT; default: the review snippets.")
    text_column: str = _opt(CompressOptions, "text_column")
    label_column: str | None = _opt(CompressOptions, "label_column")
    labels: list[str] | None = Field(
        default_factory=lambda: ["fresh", "rotten"],
        description="Keep only rows with these labels (None keeps all).",
    )
    calibration_samples: int = _opt(CompressOptions, "calibration_samples")
    eval_samples: int = Field(
        1200,
        ge=10,
        description="Held-out rows for the benchmark task (perplexity: the text's last rows, in "
        "order; calibration its first rows; other tasks: a seeded shuffle).",
    )
    seed: int = Field(0, description="Seed of the calibration/evaluation split.")


class CalibrationConfig(_Section):
    """Activation statistics (or the Fisher) for the data-aware methods."""

    max_length: int = _opt(CompressOptions, "max_length")
    batch_size: int = _opt(CompressOptions, "batch_size")
    fisher_task: FisherTask = _opt(CompressOptions, "fisher_task")
    fisher_samples: int | None = _opt(CompressOptions, "fisher_samples")
    sequential: bool = _opt(CompressOptions, "sequential")
    sequential_blocks: int = _opt(CompressOptions, "sequential_blocks")
    sequential_ridge: float = _opt(CompressOptions, "sequential_ridge")
    loss_aware: bool = _opt(CompressOptions, "loss_aware")
    shrinkage: Shrinkage = _opt(CompressOptions, "shrinkage")
    blend: Blend = _opt(CompressOptions, "blend")
    blend_weight: float | None = _opt(CompressOptions, "blend_weight")
    generated_samples: int = _opt(CompressOptions, "generated_samples")
    output_gram: bool = _opt(CompressOptions, "output_gram")


class CompressConfig(_Checked):
    """The plan and its rewrite; same names, defaults and ranges as ``factorlm compress``."""

    checked_by = CompressOptions

    method: Method = _opt(CompressOptions, "method")
    ratio: float = _opt(CompressOptions, "ratio")
    energy: float | None = _opt(CompressOptions, "energy")
    rank_multiple: int = _opt(CompressOptions, "rank_multiple")
    allocation: Allocation = _opt(CompressOptions, "allocation")
    error_scale: ErrorScale = _opt(CompressOptions, "error_scale")
    min_fraction: float = _opt(CompressOptions, "min_fraction")
    include: str | None = _opt(CompressOptions, "include")
    exclude: str | None = _opt(CompressOptions, "exclude")
    embeddings: float | None = _opt(CompressOptions, "embeddings")
    min_size: int = _opt(CompressOptions, "min_size")
    joint_qkv: bool = _opt(CompressOptions, "joint_qkv")
    plan: Path | None = _opt(CompressOptions, "plan")
    sparse_structure: SparseStructure = _opt(CompressOptions, "sparse_structure")
    sparse_density: float = _opt(CompressOptions, "sparse_density")
    ray_address: str | None = _opt(CompressOptions, "ray_address")
    target_speedup: float | None = _opt(CompressOptions, "target_speedup")
    target_latency_ms: float | None = _opt(CompressOptions, "target_latency_ms")
    latency_shape: str = _opt(CompressOptions, "latency_shape")
    latency_past: int = _opt(CompressOptions, "latency_past")
    latency_precision: LatencyPrecision = _opt(CompressOptions, "latency_precision")
    latency_threads: int = _opt(CompressOptions, "latency_threads")
    latency_optimize: bool = _opt(CompressOptions, "latency_optimize")
    latency_budget_s: float = _opt(CompressOptions, "latency_budget_s")


class RecoverConfig(_Section):
    """Optional recovery by distillation between compress and build (skipped when method is null)."""

    method: RecoverMethod | None = _opt(RecoverOptions, "method", default=None)
    steps: int = _opt(RecoverOptions, "steps")
    time_budget_s: float | None = _opt(RecoverOptions, "time_budget_s")
    clock: Clock = _opt(RecoverOptions, "clock")
    lr: float = _opt(RecoverOptions, "lr")
    feature_fraction: float = _opt(RecoverOptions, "feature_fraction")
    temperature: float = _opt(RecoverOptions, "temperature")
    lm_weight: float = _opt(RecoverOptions, "lm_weight")
    batch_size: int = _opt(RecoverOptions, "batch_size")
    max_samples: int | None = _opt(RecoverOptions, "max_samples")
    seed: int = _opt(RecoverOptions, "seed")


class BuildConfig(_Checked):
    """Engines to build for both the original and the compressed model."""

    checked_by = BuildOptions

    backend: Backend = _opt(BuildOptions, "backend")
    optimize: bool = _opt(BuildOptions, "optimize")
    int8: bool = _opt(BuildOptions, "int8")
    int8_mode: Int8Mode = _opt(BuildOptions, "int8_mode")
    int4: bool = _opt(BuildOptions, "int4")
    int4_block_size: int = _opt(BuildOptions, "int4_block_size")
    int4_accuracy_level: int = _opt(BuildOptions, "int4_accuracy_level")
    fp16: bool = _opt(BuildOptions, "fp16")
    format: EngineFormat = _opt(BuildOptions, "format")


class GoalsConfig(_Section):
    """Pass/fail criteria; the run's exit status is 1 when one fails."""

    max_accuracy_drop: float | None = _opt(BenchOptions, "max_accuracy_drop")
    min_speedup: float | None = _opt(BenchOptions, "min_speedup")
    max_fidelity_loss: float | None = _opt(BenchOptions, "max_fidelity_loss")


class BenchmarkConfig(_Section):
    """Latency and accuracy of the compressed engine against the original engine."""

    shapes: list[str] = _opt(BenchOptions, "shapes")
    task: Task = _opt(BenchOptions, "task")
    warmup: int = _opt(BenchOptions, "warmup")
    iterations: int = _opt(BenchOptions, "iterations")
    baseline: Path | None = _opt(BenchOptions, "baseline")
    max_regression: float | None = _opt(BenchOptions, "max_regression")
    prefill_lengths: list[PositiveInt] = _opt(BenchOptions, "prefill_lengths")
    decode_past: list[PositiveInt] = _opt(BenchOptions, "decode_past")
    decode_batches: list[PositiveInt] = _opt(BenchOptions, "decode_batches")
    max_new_tokens: int = _opt(BenchOptions, "max_new_tokens")
    generation_prompts: int = _opt(BenchOptions, "generation_prompts")
    goals: GoalsConfig = GoalsConfig()

    @field_validator("shapes")
    @classmethod
    def _check_shapes(cls, shapes: list[str]) -> list[str]:
        for shape in shapes:
            parts = shape.lower().split("x")
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"shape {shape!r} is not BATCHxSEQUENCE, e.g. 8x128")
        return shapes


def _validate(cls: type[Any], values: dict[str, Any]) -> None:
    """Cross-field checks of the option class, as a pydantic error naming the section."""
    try:
        cls(**values)
    except ConfigError as exc:
        raise ValueError(str(exc).rstrip(".")) from None


class RunConfig(_Section):
    """One ``factorlm run`` job: export, calibrate, plan, compress, build, benchmark."""

    model: Path | None = Field(None, description="HF model folder or .onnx; default: MiniLM.")
    output_dir: Path = Field(Path("factorlm-run"), description="Folder of every stage's output.")
    export: ExportConfig = ExportConfig()
    data: DataConfig = DataConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    compress: CompressConfig = CompressConfig()
    recover: RecoverConfig = RecoverConfig()
    build: BuildConfig = BuildConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()

    def value(self, key: str) -> Any:
        """The value at dotted ``key``, e.g. ``"calibration.max_length"``."""
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def options(self, cls: type[_O], **changes: Any) -> _O:
        """The option object of one stage, filled from this config (options without a YAML key
        keep their defaults; ``changes`` override)."""
        values: dict[str, Any] = {}
        for f in option_fields(cls):
            key = yaml_key(cls, f.name)
            if key is not None:
                value = self.value(key)
                if value is None and f.metadata.get("yaml_optional"):
                    continue
                values[f.name] = value
        return cls(**{**values, **changes})

    def calibration_settings(self) -> dict[str, Any]:
        """The calibration section as the calibrate stage's key sees it (JSON).

        Why: ``fisher_samples`` bounds only the gradient passes (``fwsvd``, ``loss_aware``);
        for any other method it changes nothing, so it must not make a new calibration.
        """
        gradients = self.compress.method == "fwsvd" or self.calibration.loss_aware
        return self.calibration.model_dump(
            mode="json", exclude=None if gradients else {"fisher_samples"}
        )


def json_schema() -> dict[str, Any]:
    """The JSON schema of the YAML config (published as docs/config.schema.json)."""
    schema = RunConfig.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "title": "factorlm run config",
    }


def json_schema_text() -> str:
    """``json_schema()`` as the exact text of docs/config.schema.json."""
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def _section_fields(loc: tuple[Any, ...], root: type[BaseModel] = RunConfig) -> list[str]:
    """The valid keys at the place in the config where an unknown key was found."""
    model: type[BaseModel] = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def describe_validation_error(error: Any, source: str, root: type[BaseModel] = RunConfig) -> str:
    """One sentence for a pydantic error of model ``root``: the dotted key, and for an unknown key
    the closest valid one (also used for sweep files, whose ``root`` is their own model)."""
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        key = str(loc[-1])
        close = difflib.get_close_matches(key, _section_fields(loc, root), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{source}: unknown key '{where}'{hint}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{source}: '{where}' is invalid: {message}."


def parse_config(data: dict[str, Any] | None, source: str = "config") -> RunConfig:
    """Validate a parsed YAML mapping; raise ConfigError naming the first bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections, not a list or value."
        )
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc.errors()[0], source)) from None


def load_config(path: Path) -> RunConfig:
    """Read and validate a YAML config file; relative paths in it resolve against its folder."""
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    data = read_yaml(path, what="config file")
    config = parse_config(data, source=str(path))
    return _resolve_paths(config, path.parent)


def _resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    def resolve(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    return config.model_copy(
        update={
            "model": resolve(config.model),
            "output_dir": resolve(config.output_dir),
            "data": config.data.model_copy(update={"path": resolve(config.data.path)}),
            "compress": config.compress.model_copy(update={"plan": resolve(config.compress.plan)}),
            "benchmark": config.benchmark.model_copy(
                update={"baseline": resolve(config.benchmark.baseline)}
            ),
        }
    )
