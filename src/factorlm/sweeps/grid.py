"""The grid: one validated ``RunConfig`` per combination of axis values, with a stable id.

A trial's id is a hash of its whole run config (the output folder excluded), so the same trial
keeps its id and folder across reruns of the sweep, whatever the order of the axes, while a
change of the base config gives new ids: an interrupted sweep resumes exactly the trials that
did not finish, and never reuses a result computed under other settings.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from factorlm.errors import ConfigError
from factorlm.pipeline.config import RunConfig, parse_config

__all__ = ["TRIALS_DIR", "Trial", "expand", "resolve_paths", "trial_id"]

logger = logging.getLogger(__name__)

#: Trials live in ``<output_dir>/trials/<id>/`` (each one a ``factorlm run`` output folder).
TRIALS_DIR = "trials"


@dataclass(frozen=True)
class Trial:
    """One point of the grid: its axis values and the run config that realizes them."""

    id: str
    params: dict[str, Any]
    config: RunConfig

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items())


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    node = data
    for part in sections:
        node = node.setdefault(part, {})
    node[leaf] = value


def _is_path(annotation: Any) -> bool:
    return annotation is Path or Path in typing.get_args(annotation)


def resolve_paths(config: RunConfig, root: Path) -> RunConfig:
    """Make every relative path option of ``config`` absolute against ``root``.

    Walks the schema instead of naming the path keys, so a path option added to the run config
    later resolves too.
    """

    def walk(model: BaseModel) -> BaseModel:
        update: dict[str, Any] = {}
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                resolved = walk(value)
                if resolved is not value:
                    update[name] = resolved
            elif _is_path(field.annotation) and isinstance(value, Path) and not value.is_absolute():
                update[name] = root / value
        return model.model_copy(update=update) if update else model

    result = walk(config)
    assert isinstance(result, RunConfig)
    return result


def trial_id(config: RunConfig) -> str:
    """A stable short hash of a run config, its output folder excluded."""
    settings = config.model_dump(mode="json", exclude={"output_dir"})
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _label(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def expand(
    base_config: RunConfig,
    axes: Mapping[str, list[Any]],
    *,
    output_dir: Path,
    root: Path,
    source: str = "sweep",
) -> list[Trial]:
    """Every trial of the grid ``axes`` over ``base_config``, in grid order (the last axis varies
    fastest), each in ``output_dir/trials/<id>``; relative paths resolve against ``root``.

    Each trial's config is validated like a run config; an invalid combination raises
    ConfigError naming its axis values.
    """
    base = base_config.model_dump(mode="json")
    keys = list(axes)
    trials: list[Trial] = []
    seen: dict[str, dict[str, Any]] = {}
    for values in itertools.product(*(axes[k] for k in keys)):
        params = dict(zip(keys, values, strict=True))
        data = copy.deepcopy(base)
        for key, value in params.items():
            _set(data, key, value)
        data.pop("output_dir", None)
        run = parse_config(data, source=f"{source} (trial {_label(params)})")
        run = resolve_paths(run, root)
        ident = trial_id(run)
        if ident in seen:
            raise ConfigError(
                f"{source}: trials {_label(seen[ident])} and {_label(params)} are the "
                "same run config; remove the duplicate axis value."
            )
        seen[ident] = params
        run = run.model_copy(update={"output_dir": output_dir / TRIALS_DIR / ident})
        trials.append(Trial(ident, params, run))
    logger.debug("Sweep %s: %d trials", source, len(trials))
    return trials
