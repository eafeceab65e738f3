"""The ``factorlm run`` pipeline: a validated YAML config and hash-keyed stages."""

from __future__ import annotations

from factorlm.pipeline.config import RunConfig, load_config, parse_config
from factorlm.pipeline.run import RunResult, run_pipeline

__all__ = ["RunConfig", "RunResult", "load_config", "parse_config", "run_pipeline"]
