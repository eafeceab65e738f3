"""One entry point that builds an engine folder from ``BuildOptions``, whatever the backend.

Why: ``factorlm.build``, the ``build`` CLI verb and the pipeline's build stage all pick the backend
from the same options object; this module is the one place that maps those options onto the ORT
or TensorRT builder, so the three cannot drift.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from factorlm.errors import ConfigError
from factorlm.options import BuildOptions, replace

if TYPE_CHECKING:
    from factorlm.exporters.ort import EngineManifest

__all__ = ["build_engine"]

logger = logging.getLogger(__name__)


def build_engine(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: BuildOptions | None = None,
    *,
    reference: str | os.PathLike[str] | Mapping[str, int] | None = None,
    data: str | os.PathLike[str] | Sequence[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    timing_cache_file: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> EngineManifest:
    """Build ``out_dir`` (engine + manifest.json) from ``model`` with ``options.backend``.

    ``reference`` (ORT only): the original model, or its engine's fusion counts, to warn about a
    fusion the engine lost against it. ``data``/``tokenizer`` (ORT static int8 only): calibration texts (a file or a list) and
    the tokenizer folder (default: next to the model). ``timing_cache_file`` (TensorRT only): where the timing cache lives instead of the cache
    folder.
    """
    opts = options or BuildOptions()
    if overrides:
        opts = replace(opts, **overrides)
    if opts.backend == "tensorrt":
        if reference is not None:
            raise ConfigError("build option 'reference' applies to the ort backend only.")
        if data is not None or tokenizer is not None:
            raise ConfigError(
                "calibration data/tokenizer apply to the ort backend (static int8) only; "
                "TensorRT takes a calibration .npz."
            )
        if timing_cache_file is not None and not opts.timing_cache:
            raise ConfigError("Give either a timing cache file or timing_cache=False, not both.")
        from factorlm.exporters.tensorrt import build_trt_engine

        return build_trt_engine(
            model,
            out_dir,
            shapes=list(opts.shapes) or None,
            fp16=opts.fp16,
            bf16=opts.bf16,
            int8=opts.int8,
            calibration=opts.calibration,
            sparse=opts.sparse,
            timing_cache=(timing_cache_file or None) if opts.timing_cache else False,
            workspace_gib=opts.workspace_gib,
            overwrite=overwrite,
            progress=progress,
        )
    if timing_cache_file is not None:
        raise ConfigError("a timing cache file applies to the tensorrt backend only, not to ort.")
    from factorlm.exporters.ort import build_ort_engine

    return build_ort_engine(
        model,
        out_dir,
        opts,
        data=data,
        tokenizer=tokenizer,
        reference=reference,
        overwrite=overwrite,
        progress=progress,
    )
