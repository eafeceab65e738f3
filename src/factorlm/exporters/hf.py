"""Export a Hugging Face model folder to ONNX with optimum, then prove it against PyTorch.

Why our own validation: optimum's check uses an absolute tolerance (1e-5 by default) on random
dummy inputs, which flags float noise on large logits and KV caches and says nothing about real
text. Here the exported graph and the PyTorch model run on the same tokenized sentences (padded,
so the attention mask matters) and each output is judged by ``max|onnx - torch| / max|torch|``,
a tolerance relative to the output's scale. The export goes to a temporary folder next to the
destination and is renamed into place only once it validates.

The weights are written tensor by tensor to ``model.onnx_data`` beside ``model.onnx``
(``exporters.streamed``): torch's exporter would otherwise hold the serialized model three times
over while the PyTorch model is loaded. The graph and every value are the plain export's.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from factorlm._common.files import (
    EXPORT_RECORD,
    copy_sidecars,
    sidecar_paths,
    staged_directory,
    versions,
    write_text_atomic,
)
from factorlm._common.outputs import check_output
from factorlm._common.sessions import create_session
from factorlm._common.text import text_feeds
from factorlm._common.userfiles import check_torch_file, read_json
from factorlm.errors import ConfigError, ModelLoadError

__all__ = [
    "TASKS",
    "ExportResult",
    "OutputCheck",
    "check_model_dir",
    "export",
    "export_source",
    "load_torch_model",
    "validate",
    "write_export_record",
]

logger = logging.getLogger(__name__)

TASKS = (
    "feature-extraction",
    "text-classification",
    "text-generation",
    "text-generation-with-past",
)

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
_SAMPLE_TEXTS = (
    "The film is a quiet triumph, funny and sad in equal measure.",
    "A tedious, overlong mess.",
)


@dataclass(frozen=True)
class OutputCheck:
    """How one ONNX output compares with PyTorch on the validation batch."""

    name: str
    max_abs_diff: float
    scale: float  # max |reference|

    @property
    def relative(self) -> float:
        """Max difference relative to the output's scale."""
        return self.max_abs_diff / self.scale if self.scale > 0 else self.max_abs_diff


@dataclass(frozen=True)
class ExportResult:
    """The exported model and the evidence that it matches PyTorch."""

    model: Path
    task: str
    opset: int
    checks: tuple[OutputCheck, ...] = field(default_factory=tuple)
    rtol: float = 1e-3
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        """Largest absolute difference over every output."""
        return max((c.max_abs_diff for c in self.checks), default=0.0)

    @property
    def max_relative(self) -> float:
        """Largest scale-relative difference over every output."""
        return max((c.relative for c in self.checks), default=0.0)


def check_model_dir(model_dir: Path, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """Return the folder's config.json after checking it is a loadable, safe HF model folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir} is not a folder; pass a Hugging Face model folder.")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{model_dir} is not a Hugging Face model folder (no config.json).")
    config = read_json(config_path, what="model config", error=ModelLoadError)
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(f"{config_path} does not name a model_type.")
    if not any(next(model_dir.glob(p), None) for p in _WEIGHT_PATTERNS):
        raise ModelLoadError(
            f"{model_dir} has no weights (*.safetensors or pytorch_model.bin) next to config.json."
        )
    if next(model_dir.glob("*.safetensors"), None) is None:
        for weights in sorted(model_dir.glob("*.bin")):
            check_torch_file(weights)  # pickled weights: tensors only, refused before any work
    if not trust_remote_code:
        from transformers import CONFIG_MAPPING

        if config["model_type"] not in CONFIG_MAPPING:
            needs = "its own Python code" if "auto_map" in config else "an unknown architecture"
            raise ModelLoadError(
                f"{model_dir} needs {needs} (model_type {config['model_type']!r}); "
                "pass --trust-remote-code only if you trust that code."
            )
    return config


def load_torch_model(model_dir: Path, task: str, trust_remote_code: bool = False) -> Any:
    """The PyTorch model of a Hugging Face folder for ``task``, fp32, in eval mode.

    Export validation and recovery need the model the ONNX graph was exported from, loaded the
    same way; this is the loader they share.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    loaders: dict[str, Callable[..., Any]] = {
        "feature-extraction": AutoModel.from_pretrained,
        "text-classification": AutoModelForSequenceClassification.from_pretrained,
        "text-generation": AutoModelForCausalLM.from_pretrained,
        "text-generation-with-past": AutoModelForCausalLM.from_pretrained,
    }
    model = loaders[task](model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    return model


def _tokenize(model_dir: Path, trust_remote_code: bool) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    batch = tokenizer(list(_SAMPLE_TEXTS), padding=True, return_tensors="np")
    return {k: np.asarray(v, dtype=np.int64) for k, v in batch.items()}


def validate(
    onnx_model: Path,
    model_dir: Path,
    task: str,
    *,
    trust_remote_code: bool = False,
    torch_model: Any = None,
) -> tuple[OutputCheck, ...]:
    """Run the ONNX model and PyTorch on the same real sentences; compare every output.

    The ONNX session runs and is closed before the PyTorch model is loaded, so the two copies
    of the weights are never in memory together (unless the caller passes ``torch_model``).
    """
    import torch

    tokens = _tokenize(model_dir, trust_remote_code)
    session = create_session(onnx_model, graph_optimization_level="basic")
    feeds = text_feeds(session.get_inputs(), tokens, str(onnx_model))
    output_names = [o.name for o in session.get_outputs()]
    onnx_out = dict(zip(output_names, session.run(output_names, feeds), strict=True))
    del session
    gc.collect()
    model = torch_model or load_torch_model(model_dir, task, trust_remote_code)

    kwargs: dict[str, Any] = {
        k: torch.from_numpy(v) for k, v in feeds.items() if not k.startswith("past_key_values")
    }
    if task.startswith("text-generation"):
        kwargs["use_cache"] = task.endswith("with-past")
    with torch.inference_mode():
        out = model(**kwargs)
    reference: dict[str, np.ndarray] = {}
    for name in ("last_hidden_state", "logits"):
        value = getattr(out, name, None)
        if value is not None:
            reference[name] = value.float().numpy()
    cache = getattr(out, "past_key_values", None)
    if cache is not None:
        legacy = cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else cache
        for i, (key, value) in enumerate(legacy):
            reference[f"present.{i}.key"] = key.float().numpy()
            reference[f"present.{i}.value"] = value.float().numpy()

    checks = []
    for name, got in onnx_out.items():
        if name not in reference:
            logger.info("Output %s has no PyTorch counterpart; not compared", name)
            continue
        ref = reference[name]
        if ref.shape != got.shape:
            raise ModelLoadError(
                f"{onnx_model} output {name} has shape {got.shape}, PyTorch gives {ref.shape}."
            )
        diff = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        checks.append(OutputCheck(name, diff, scale))
    if not checks:
        raise ModelLoadError(f"{onnx_model} has no output that PyTorch also produces.")
    return tuple(checks)


def _release_heap() -> None:
    """Collect garbage and return freed heap to the OS (glibc ``malloc_trim``; Linux only).

    Why: torch's exporter leaves about twice the model in freed but unreturned heap (its
    serialized copies; BERT-base: 1,259 -> 477 MiB resident), which would otherwise stay
    resident under validation and the stages after it.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def export(
    model_dir: Path,
    out_dir: Path,
    *,
    task: str = "feature-extraction",
    opset: int | None = None,
    trust_remote_code: bool = False,
    rtol: float = 1e-3,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportResult:
    """Export ``model_dir`` to ``out_dir/model.onnx`` (weights in ``model.onnx_data``, plus the
    tokenizer and config) and validate it.

    Raises ``ModelLoadError`` for a folder that is not a model and when an output differs from
    PyTorch by more than ``rtol`` times that output's largest magnitude; ``ConfigError`` for an
    unsupported task/opset or an existing non-empty ``out_dir`` without ``overwrite``.
    ``out_dir/factorlm-export.json`` records the source folder (absolute), task, opset and
    versions (see :func:`export_source`).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if task not in TASKS:
        raise ConfigError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if opset is not None and not 11 <= opset <= 23:
        raise ConfigError(f"Opset {opset} is outside the supported range 11-23.")
    if not rtol > 0:
        raise ConfigError(f"The validation tolerance rtol={rtol} must be positive.")
    check_model_dir(model_dir, trust_remote_code=trust_remote_code)
    check_output(out_dir, inputs=[model_dir], overwrite=overwrite, kind="folder")

    sidecar_paths(model_dir)  # a tokenizer file linked from elsewhere is refused before any work

    from optimum.exporters.onnx import main_export
    from rich.console import Console

    from factorlm.exporters.streamed import streamed_weights

    start = time.perf_counter()
    console = Console(stderr=True, quiet=not progress)
    with staged_directory(out_dir) as stage:
        with (
            console.status(f"Exporting {model_dir.name} ({task}) with optimum"),
            streamed_weights(),  # weights to model.onnx_data one by one, not one whole proto
        ):
            try:
                main_export(
                    str(model_dir),
                    output=stage,
                    task=task,
                    opset=opset,
                    device="cpu",
                    dtype="fp32",
                    library_name="transformers",
                    trust_remote_code=trust_remote_code,
                    local_files_only=True,
                    do_validation=False,
                )
            except ValueError as exc:
                raise ConfigError(f"optimum cannot export {model_dir} as {task}: {exc}") from exc
            except (OSError, KeyError) as exc:
                raise ModelLoadError(f"{model_dir} could not be loaded for export: {exc}") from exc
        _release_heap()  # the exporter's proto copies are garbage now; validation runs next
        onnx_path = stage / "model.onnx"
        if not onnx_path.is_file():
            raise ModelLoadError(f"optimum wrote no model.onnx for {model_dir} ({task}).")
        copy_sidecars(model_dir, stage, skip_existing=True)
        with console.status("Validating the ONNX outputs against PyTorch"):
            checks = validate(onnx_path, model_dir, task, trust_remote_code=trust_remote_code)
        for check in checks:
            logger.info(
                "%s: max |onnx - torch| = %.3g (scale %.3g, relative %.3g)",
                check.name, check.max_abs_diff, check.scale, check.relative,
            )  # fmt: skip
        worst = max(checks, key=lambda c: c.relative)
        if worst.relative > rtol:
            raise ModelLoadError(
                f"The ONNX export of {model_dir} differs from PyTorch on output {worst.name} by "
                f"{worst.max_abs_diff:.3g} ({worst.relative:.2g} of its scale {worst.scale:.3g}, "
                f"tolerance {rtol:g})."
            )
        opset_used = _onnx_opset(onnx_path)
        write_export_record(stage, model_dir, task=task, opset=opset_used)
    return ExportResult(
        model=out_dir / "model.onnx",
        task=task,
        opset=opset_used,
        checks=checks,
        rtol=rtol,
        seconds=time.perf_counter() - start,
    )


def write_export_record(folder: Path, source: Path, *, task: str, opset: int | None = None) -> Path:
    """Write ``folder/factorlm-export.json``: the source folder (absolute), task, opset, versions."""
    if opset is None:
        opset = _onnx_opset(folder / "model.onnx")
    record = {
        "format": 1,
        "source": str(Path(source).resolve()),
        "task": task,
        "opset": opset,
        "versions": versions(),
    }
    return write_text_atomic(folder / EXPORT_RECORD, json.dumps(record, indent=2) + "\n")


def export_source(model: str | Path) -> Path | None:
    """The Hugging Face folder an exported ``model`` (a .onnx file or its folder) came from.

    Read from the ``factorlm-export.json`` record that ``export`` writes and every copy of the
    sidecars carries; None when there is no record. The path may no longer exist.
    """
    model = Path(model)
    folder = model if model.is_dir() else model.parent
    path = folder / EXPORT_RECORD
    if not path.is_file():
        return None
    record = read_json(path, what="export record")
    source = record.get("source") if isinstance(record, dict) else None
    if not isinstance(source, str) or not source:
        raise ModelLoadError(f"The export record {path} names no source folder.")
    return Path(source)
