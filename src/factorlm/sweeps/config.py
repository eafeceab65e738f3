"""The sweep file: a ``factorlm run`` config, axes over its options, and a selection rule.

```yaml
base: run.yaml                 # or an inline run config mapping
output_dir: sweep-out          # trials/<id>/ (one pipeline output folder per trial) + results
axes:                          # dotted run-config key -> values; the grid is their product
  compress.method: [svd, whiten]
  compress.ratio: [0.5, 0.7]
select:                        # best quality with speedup >= 1.5x (or `pareto: true`)
  maximize: quality
  subject_to: {min_speedup: 1.5}
ray: {address: null, num_cpus: null, cpus_per_trial: 1, max_concurrent: null}
```

Validated like the run config (pydantic, unknown keys named with the closest valid key), and
every axis key is checked against the ``RunConfig`` schema before anything runs, because a
misspelt axis would otherwise run a grid of identical trials for hours.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from factorlm._common.userfiles import read_yaml
from factorlm.errors import ConfigError
from factorlm.pipeline.config import (
    RunConfig,
    describe_validation_error,
    load_config,
    parse_config,
)
from factorlm.sweeps.grid import Trial, expand

__all__ = [
    "MAXIMIZE",
    "MINIMIZE",
    "RESERVED_AXES",
    "Constraints",
    "RaySettings",
    "SelectRule",
    "SweepConfig",
    "SweepSpec",
    "axis_keys",
    "load_sweep",
    "parse_sweep",
]

#: Trial metrics a rule may maximize: quality (the task metric, in its better direction),
#: accuracy (classification tasks only), speedup (the slowest shape's paired speedup).
MAXIMIZE = ("quality", "accuracy", "speedup")
#: Trial metrics a rule may minimize: perplexity (causal LMs), drop (quality drop vs reference).
MINIMIZE = ("perplexity", "drop")
#: Run-config keys the sweep sets itself, so they cannot be axes.
RESERVED_AXES = frozenset({"output_dir"})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Constraints(_Section):
    """Bounds a trial must meet to be selected (all optional)."""

    min_speedup: float | None = Field(None, gt=0, description="Slowest shape's speedup >= this.")
    max_drop: float | None = Field(
        None, description="Quality drop vs the reference <= this (points or percent, as reported)."
    )
    min_accuracy: float | None = Field(None, description="Task accuracy >= this.")
    max_perplexity: float | None = Field(None, gt=0, description="Perplexity <= this.")


class SelectRule(_Section):
    """Which trial is best: one objective under constraints, or the quality/speedup Pareto front."""

    maximize: Literal["quality", "accuracy", "speedup"] | None = None
    minimize: Literal["perplexity", "drop"] | None = None
    pareto: bool = False
    subject_to: Constraints = Constraints()

    @model_validator(mode="after")
    def _one_objective(self) -> SelectRule:
        chosen = [n for n in ("maximize", "minimize") if getattr(self, n) is not None]
        if self.pareto:
            chosen.append("pareto")
        if len(chosen) != 1:
            raise ValueError(
                "give exactly one of maximize, minimize or pareto: true"
                + (f" (got {', '.join(chosen)})" if chosen else "")
            )
        return self


class RaySettings(_Section):
    """Where trials run: a local Ray started for the sweep, or an existing cluster."""

    address: str | None = Field(
        None, description="Existing cluster ('auto', 'ray://host:10001'); null: a local Ray."
    )
    num_cpus: PositiveInt | None = Field(None, description="CPUs of the local Ray (null: all).")
    cpus_per_trial: PositiveInt = Field(1, description="Ray CPUs each trial holds.")
    max_concurrent: PositiveInt | None = Field(
        None, description="Trials in flight at once (null: as many as the cluster's CPUs allow)."
    )


class SweepSpec(_Section):
    """The sweep file as written (before the base config is loaded)."""

    base: Path | dict[str, Any] = Field(
        default_factory=dict, description="A run config: YAML path or inline mapping."
    )
    output_dir: Path = Field(Path("factorlm-sweep"), description="Trials and results folder.")
    axes: dict[str, list[Any]] = Field(description="Dotted run-config key -> list of values.")
    select: SelectRule = Field(default_factory=lambda: SelectRule(maximize="quality"))
    ray: RaySettings = RaySettings()


class SweepConfig(BaseModel):
    """A validated sweep: the loaded base run config plus the spec's axes, rule and Ray settings."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    base: RunConfig
    output_dir: Path
    axes: dict[str, list[Any]]
    select: SelectRule
    ray: RaySettings
    #: The folder relative paths in axis values resolve against (the sweep file's folder).
    root: Path
    source: str = "sweep"

    def trials(self) -> list[Trial]:
        """Every trial of the grid, validated (see ``grid.expand``)."""
        return expand(
            self.base, self.axes, output_dir=self.output_dir, root=self.root, source=self.source
        )


def axis_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key of the run config (leaf options, not sections)."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(axis_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _check_axes(axes: Mapping[str, list[Any]], source: str) -> None:
    valid = axis_keys()
    sections = {key.rsplit(".", 1)[0] for key in valid if "." in key}
    if not axes:
        raise ConfigError(
            f"{source}: 'axes' is empty; give at least one key with a list of values."
        )
    for key, values in axes.items():
        if key in RESERVED_AXES:
            raise ConfigError(
                f"{source}: axis '{key}' cannot be swept; the sweep gives every trial its own "
                "folder under the sweep's output_dir."
            )
        if key in sections:
            raise ConfigError(
                f"{source}: axis '{key}' is a section of the run config, not an option; name "
                f"one of its keys, e.g. '{next(k for k in valid if k.startswith(key + '.'))}'."
            )
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else " (see docs/config.schema.json)."
            raise ConfigError(f"{source}: axis '{key}' is not an option of the run config{hint}")
        if not values:
            raise ConfigError(f"{source}: axis '{key}' has no values; give a non-empty list.")
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"{source}: axis '{key}' lists a value twice.")


def parse_sweep(
    data: Any, *, root: Path | None = None, source: str = "sweep", output_dir: Path | None = None
) -> SweepConfig:
    """Validate a parsed sweep mapping; relative paths resolve against ``root`` (default: cwd).

    Raises ConfigError naming the first bad key. Every trial's run config is validated too
    (``grid.expand``), so a value out of range fails here, not hours later.
    """
    root = Path(root) if root is not None else Path(os.getcwd())
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping (base, axes, select, ...).")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # typos first
        if errors[0]["type"] == "missing" and tuple(errors[0]["loc"]) == ("axes",):
            raise ConfigError(
                f"{source}: 'axes' is missing; a sweep needs axes (run-config key: [values])."
            ) from None
        raise ConfigError(describe_validation_error(errors[0], source, SweepSpec)) from None
    _check_axes(spec.axes, source)
    if isinstance(spec.base, Path):
        path = spec.base if spec.base.is_absolute() else root / spec.base
        base = load_config(path)  # its relative paths resolve against its own folder
    else:
        base = parse_config(spec.base, source=f"{source} base")
    out = output_dir if output_dir is not None else spec.output_dir
    config = SweepConfig(
        base=base,
        output_dir=out if out.is_absolute() else root / out,
        axes=spec.axes,
        select=spec.select,
        ray=spec.ray,
        root=root,
        source=source,
    )
    config.trials()  # validate every trial's config up front
    return config


def load_sweep(path: Path, *, output_dir: Path | None = None) -> SweepConfig:
    """Read and validate a sweep file; its relative paths resolve against its folder."""
    if not path.is_file():
        raise ConfigError(f"Sweep file {path} does not exist.")
    data = read_yaml(path, what="sweep file")
    return parse_sweep(data, root=path.parent.resolve(), source=str(path), output_dir=output_dir)
