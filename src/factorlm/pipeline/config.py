"""The YAML configuration of ``factorlm run``, validated by pydantic.

Every section mirrors one stage and its CLI flags, so a user can move between the command line and
a config file without learning a second vocabulary. Unknown keys are errors that name the key and
suggest the closest valid one, because a typo silently ignored would run the wrong job in CI.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from factorlm.errors import ConfigError

__all__ = [
    "BenchmarkConfig",
    "BuildConfig",
    "CalibrationConfig",
    "CompressConfig",
    "DataConfig",
    "ExportConfig",
    "GoalsConfig",
    "RecoverConfig",
    "RunConfig",
    "load_config",
    "parse_config",
]

logger = logging.getLogger(__name__)

Method = Literal["svd", "whiten", "drone", "asvd", "fwsvd", "kron", "losparse"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExportConfig(_Section):
    """How the Hugging Face model becomes ONNX (skipped when ``model`` is already an ONNX file)."""

    task: str = "feature-extraction"
    opset: int | None = None
    trust_remote_code: bool = False


class DataConfig(_Section):
    """Labelled texts, split once into disjoint calibration and evaluation sets."""

    path: Path | None = Field(None, description="JSONL/CSV/TXT; default: the review snippets.")
    text_column: str = "text"
    label_column: str | None = "label"
    labels: list[str] | None = Field(
        default_factory=lambda: ["fresh", "rotten"],
        description="Keep only rows with these labels (None keeps all).",
    )
    calibration_samples: int = Field(256, ge=1)
    eval_samples: int = Field(1200, ge=10)
    seed: int = 0


class CalibrationConfig(_Section):
    """Activation statistics for the data-aware methods."""

    max_length: int = Field(128, ge=8)
    batch_size: int = Field(16, ge=1)


class CompressConfig(_Section):
    """The plan and its rewrite; same meaning as ``factorlm compress`` flags."""

    method: Method = "whiten"
    ratio: float = Field(0.6, gt=0.0, le=1.0)
    energy: float | None = Field(None, gt=0.0, le=1.0)
    rank_multiple: int = Field(8, ge=1)
    include: str | None = None
    exclude: str | None = None
    embeddings: float | None = Field(None, gt=0.0, le=1.0)
    min_size: int | None = Field(None, ge=1)
    plan: Path | None = None
    joint_qkv: bool = Field(
        True, description="Q/K/V share one down-projection so ORT keeps its Attention fusion."
    )


class RecoverConfig(_Section):
    """Optional recovery by distillation between compress and build (skipped when method is null)."""

    method: Literal["distill", "losparse", "dsee", "kron-kd", "safe"] | None = None
    steps: int = Field(300, ge=1, description="The schedule's horizon (warm-up, phases, decay).")
    time_budget_s: float | None = Field(
        None, gt=0.0, description="A hard cap on training time; may stop before 'steps'."
    )
    clock: Literal["wall", "cpu"] = Field(
        "wall", description="What time_budget_s counts: elapsed or process CPU seconds."
    )
    lr: float = Field(1e-4, gt=0.0)
    feature_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of steps in feature distillation, then output."
    )
    temperature: float = Field(2.0, gt=0.0, description="Temperature of the logit KL.")
    lm_weight: float = Field(0.0, ge=0.0, description="Causal LM only: next-token loss weight.")
    batch_size: int = Field(16, ge=1)
    max_samples: int | None = Field(None, ge=1, description="Distillation texts (train split).")
    seed: int = 0


class BuildConfig(_Section):
    """Engines to build for both the original and the compressed model."""

    backend: Literal["ort", "tensorrt"] = "ort"
    optimize: bool = True
    int8: bool = False
    fp16: bool = False
    format: Literal["onnx", "ort"] = "onnx"


class GoalsConfig(_Section):
    """Pass/fail criteria; the run's exit status is 1 when one fails."""

    max_accuracy_drop: float | None = Field(None, ge=0.0, description="Percentage points.")
    min_speedup: float | None = Field(None, gt=0.0)
    max_fidelity_loss: float | None = Field(None, ge=0.0, le=2.0, description="1 - cosine.")


class BenchmarkConfig(_Section):
    """Latency and accuracy of the compressed engine against the original engine."""

    shapes: list[str] = Field(default_factory=lambda: ["1x128", "8x128"])
    task: Literal["classification", "perplexity", "similarity", "none"] = "classification"
    warmup: int = Field(5, ge=0)
    iterations: int = Field(30, ge=3)
    baseline: Path | None = None
    max_regression: float | None = Field(None, ge=0.0, description="Percent, vs the baseline.")
    goals: GoalsConfig = GoalsConfig()

    @field_validator("shapes")
    @classmethod
    def _check_shapes(cls, shapes: list[str]) -> list[str]:
        for shape in shapes:
            parts = shape.lower().split("x")
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"shape {shape!r} is not BATCHxSEQUENCE, e.g. 8x128")
        return shapes


class RunConfig(_Section):
    """One ``factorlm run`` job: export, calibrate, plan, compress, build, benchmark."""

    model: Path | None = Field(None, description="HF model folder or .onnx; default: MiniLM.")
    output_dir: Path = Path("factorlm-run")
    export: ExportConfig = ExportConfig()
    data: DataConfig = DataConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    compress: CompressConfig = CompressConfig()
    recover: RecoverConfig = RecoverConfig()
    build: BuildConfig = BuildConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at the place in the config where an unknown key was found."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def _describe(error: Any, source: str) -> str:
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        key = str(loc[-1])
        close = difflib.get_close_matches(key, _section_fields(loc), n=1, cutoff=0.5)
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
        raise ConfigError(_describe(exc.errors()[0], source)) from None


def load_config(path: Path) -> RunConfig:
    """Read and validate a YAML config file; relative paths in it resolve against its folder."""
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"Config file {path} is not valid YAML{where}.") from None
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
