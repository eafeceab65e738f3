"""One way to open an ONNX Runtime ``InferenceSession``: providers, threads, optimization level.

Why: export validation, calibration, the engine builder and the benchmark each opened sessions
with their own option vocabulary (``disable`` vs ``disable_all`` vs ``ORT_DISABLE_ALL``, provider
aliases in one place and not in another) and their own error for a missing provider. Here every
caller names the same settings and gets the same one-sentence ``BackendUnavailableError``.
onnxruntime is imported only when a session is made.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from factorlm.errors import BackendUnavailableError, ConfigError, ModelLoadError

__all__ = [
    "GRAPH_LEVELS",
    "PROVIDER_ALIASES",
    "create_session",
    "graph_level",
    "resolve_providers",
    "session_options",
]

logger = logging.getLogger(__name__)

#: Short provider names accepted wherever a provider is named.
PROVIDER_ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}

#: Graph optimization levels: short name -> ``onnxruntime.GraphOptimizationLevel`` member.
GRAPH_LEVELS: dict[str, str] = {
    "disable": "ORT_DISABLE_ALL",
    "disable_all": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}

_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def graph_level(level: str) -> str:
    """The ``GraphOptimizationLevel`` member name for a short (``all``) or full name."""
    full = GRAPH_LEVELS.get(level.lower(), level.upper())
    if full not in GRAPH_LEVELS.values():
        raise ConfigError(
            f"Graph optimization level {level!r} is not one of "
            f"{', '.join(k for k in GRAPH_LEVELS if k != 'disable_all')}."
        )
    return full


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """Full execution-provider names, checked against this onnxruntime build; CPU always last.

    Accepts short names (``cpu``, ``cuda``, ``tensorrt``) and full names, comma-separated or as a
    list. A provider that this build lacks raises ``BackendUnavailableError`` in one sentence.
    """
    import onnxruntime as ort

    if providers is None:
        return ["CPUExecutionProvider"]
    items = providers.split(",") if isinstance(providers, str) else list(providers)
    available = ort.get_available_providers()
    resolved: list[str] = []
    for item in (p.strip() for p in items):
        if not item:
            continue
        name = PROVIDER_ALIASES.get(item.lower(), item)
        if name not in available:
            hint = (
                "install the gpu extra with `pip install factorlm[gpu]` (onnxruntime-gpu)"
                if name in _GPU_PROVIDERS
                else "choose one of the available providers"
            )
            raise BackendUnavailableError(
                f"Execution provider {item!r} is not available in this onnxruntime build "
                f"(available: {', '.join(available)}); {hint}."
            )
        if name not in resolved:
            resolved.append(name)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


def session_options(
    *,
    graph_optimization_level: str = "all",
    intra_op_num_threads: int = 0,
    inter_op_num_threads: int = 0,
    allow_spinning: bool | None = None,
    optimized_model_filepath: str | os.PathLike[str] | None = None,
    config_entries: Mapping[str, str] | None = None,
    log_severity_level: int | None = None,
) -> Any:
    """An ``onnxruntime.SessionOptions`` from plain settings (0 threads = ORT's default).

    ``allow_spinning`` None keeps ORT's default; ``optimized_model_filepath`` saves the optimized
    graph (how the engine builder optimizes offline); ``config_entries`` are added verbatim.
    """
    import onnxruntime as ort

    if intra_op_num_threads < 0 or inter_op_num_threads < 0:
        raise ConfigError("Thread counts must be 0 (ONNX Runtime's default) or positive.")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, graph_level(graph_optimization_level)
    )
    options.intra_op_num_threads = int(intra_op_num_threads)
    options.inter_op_num_threads = int(inter_op_num_threads)
    if log_severity_level is not None:
        options.log_severity_level = log_severity_level
    if allow_spinning is not None:
        spin = "1" if allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if optimized_model_filepath is not None:
        options.optimized_model_filepath = str(optimized_model_filepath)
    for key, value in (config_entries or {}).items():
        options.add_session_config_entry(key, value)
    return options


def create_session(
    model: str | os.PathLike[str] | bytes,
    *,
    providers: Sequence[str] | str | None = None,
    options: Any = None,
    what: str | None = None,
    **settings: Any,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for a model file (or serialized bytes).

    ``providers`` go through :func:`resolve_providers`; ``settings`` are
    :func:`session_options` keywords (ignored when a ready ``options`` is given). A model ORT
    cannot load raises ``ModelLoadError`` naming ``what`` (default: the path) and ORT's first
    error line.
    """
    import onnxruntime as ort

    chosen = resolve_providers(providers)
    so = options if options is not None else session_options(**settings)
    source = model if isinstance(model, bytes) else os.fspath(model)
    try:
        return ort.InferenceSession(source, so, providers=chosen)
    except Exception as exc:  # ORT raises its own exception types for every load failure
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        name = what or ("the model" if isinstance(model, bytes) else str(model))
        raise ModelLoadError(f"ONNX Runtime could not load {name}: {first}") from exc
