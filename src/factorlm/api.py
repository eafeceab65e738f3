"""The verbs of the Python API that have no module of their own: ``build`` and ``run``.

``factorlm.export``, ``factorlm.compress``, ``factorlm.build``, ``factorlm.benchmark`` and
``factorlm.run`` mirror the CLI subcommands one to one (see ``factorlm/__init__.py``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from factorlm.errors import ConfigError

__all__ = ["build", "run"]

logger = logging.getLogger(__name__)


def build(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    backend: str = "ort",
    **options: Any,
) -> Any:
    """Build an engine directory like ``factorlm build``; returns its manifest.

    ``options`` go to ``factorlm.exporters.ort.build_ort_engine`` or
    ``factorlm.exporters.tensorrt.build_trt_engine``.
    """
    if backend == "ort":
        from factorlm.exporters.ort import build_ort_engine

        return build_ort_engine(model, out_dir, **options)
    if backend == "tensorrt":
        from factorlm.exporters.tensorrt import build_trt_engine

        return build_trt_engine(model, out_dir, **options)
    raise ConfigError(f"Unknown backend {backend!r}; choose 'ort' or 'tensorrt'.")


def run(config: Any = None, **overrides: Any) -> Any:
    """Run the whole job like ``factorlm run``; returns a ``RunResult``.

    ``config`` is None (the embedded default), a YAML path, a mapping or a ``RunConfig``;
    ``overrides`` replace top-level keys (e.g. ``output_dir="out"``).
    """
    from factorlm.pipeline.config import RunConfig, load_config, parse_config
    from factorlm.pipeline.run import run_pipeline

    if config is None:
        resolved = RunConfig()
    elif isinstance(config, RunConfig):
        resolved = config
    elif isinstance(config, str | os.PathLike):
        resolved = load_config(Path(config))
    elif isinstance(config, dict):
        resolved = parse_config(config)
    else:
        raise ConfigError(
            f"config must be a path, a mapping or a RunConfig, not {type(config).__name__}."
        )
    if overrides:
        resolved = parse_config({**resolved.model_dump(mode="json"), **overrides})
    return run_pipeline(resolved)
