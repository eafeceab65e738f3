"""Every statistic a set of compress options asks for, collected in one place.

Why one function: ``factorlm compress`` (CLI), ``factorlm run``'s calibrate stage and the
``compress()`` API must collect the same statistics the same way for the same options: the Gram
(with its held-back part for ``shrinkage auto``, and its Gram on generic text for ``blend``),
FWSVD's Fisher, the loss-aware output Fisher or Gram, and the model's own sampled text
(``generated_samples``). The callers differ only in where the PyTorch weights come from
(``torch_folder``; the API has none).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from factorlm.calibration.capture import collect_statistics
from factorlm.calibration.fisher import collect_fisher, collect_output_fisher, collect_output_gram
from factorlm.calibration.stats import CalibrationStats
from factorlm.errors import ConfigError

if TYPE_CHECKING:
    from factorlm.options import CompressOptions

__all__ = ["GENERIC_TEXTS", "collect_requested", "generic_statistics"]

logger = logging.getLogger(__name__)

#: Records of factorlm's mixed-genre set whose Grams ``blend`` mixes in (generic text).
GENERIC_TEXTS = 64


def generic_statistics(
    model: Path,
    *,
    tokenizer: Path | None = None,
    max_length: int = 256,
    batch_size: int = 4,
    cache_dir: Path | None = None,
    fisher_weights: Path | None = None,
    fisher_task: str = "auto",
) -> CalibrationStats:
    """The Grams of ``model``'s weights on generic text, for ``blend``: the first
    ``GENERIC_TEXTS`` records of factorlm's mixed-genre set (cached like any calibration).

    ``fisher_weights`` (the PyTorch folder; ``blend`` under ``loss_aware``): the output Fisher
    on the same texts too, in ``output_fisher_generic``. Why: the output Fisher of a narrow set
    weights the output features that genre's next tokens need, which is the second half of the
    cross-domain loss (issue 16); the generic one is blended in by the same rule as the Gram.
    """
    from factorlm.assets.mixed import mixed_calibration_texts

    texts = mixed_calibration_texts(GENERIC_TEXTS)
    stats = collect_statistics(
        model,
        texts,
        tokenizer=tokenizer,
        max_samples=GENERIC_TEXTS,
        max_length=max_length,
        batch_size=batch_size,
        cache_dir=cache_dir,
    )
    if fisher_weights is not None:
        stats.output_fisher_generic = collect_output_fisher(
            fisher_weights,
            model,
            texts,
            task=fisher_task,
            max_samples=GENERIC_TEXTS,
            max_length=max_length,
            batch_size=batch_size,
            cache_dir=cache_dir,
        )
    return stats


def _gradient_samples(opts: CompressOptions, texts: int) -> int:
    """How many of ``texts`` calibration texts the gradient statistics run backward on."""
    return min(texts, opts.fisher_samples) if opts.fisher_samples else texts


def collect_requested(
    model: Path,
    data: Path,
    opts: CompressOptions,
    *,
    torch_folder: Callable[[str], Path] | None,
    tokenizer: Path | None = None,
    labels: Sequence[str] | None = None,
) -> CalibrationStats | None:
    """The statistics ``opts`` needs from ``data`` for the ONNX ``model`` (None: none needed).

    ``torch_folder(why)`` returns the Hugging Face folder with the PyTorch weights (gradients and
    sampling need them) or raises naming ``why``; None refuses every option that needs them.
    """
    need = opts.needs_statistics
    if need is None:
        return None

    def weights(why: str) -> Path:
        if torch_folder is None:
            raise ConfigError(
                f"{why} needs the PyTorch weights, which compress() does not take: pass stats= "
                "collected with factorlm.calibration, or use the CLI or factorlm run."
            )
        return torch_folder(why)

    label_column = opts.label_column or "label"
    if opts.ray_address is not None and (need == "fisher" or opts.loss_aware or opts.blending):
        logger.info(
            "Gradient statistics (Fisher, output Fisher/Gram: PyTorch) and blend's generic "
            "Grams are collected in this process; only the calibration set's input Grams are "
            "gathered on Ray workers."
        )
    if need == "fisher":
        fisher = collect_fisher(
            weights("method 'fwsvd'"),
            model,
            data,
            task=opts.fisher_task,
            text_column=opts.text_column,
            label_column=label_column,
            labels=labels,
            max_samples=_gradient_samples(opts, opts.calibration_samples),
            max_length=opts.max_length,
        )
        return CalibrationStats(gram={}, mean_abs={}, fisher=fisher, tokens=0)
    texts: Path | list[str] = data
    samples = opts.calibration_samples
    if opts.generated_samples:  # the data's texts and the model's own, interleaved
        from factorlm.calibration.generated import generated_texts, with_generated
        from factorlm.data import load_texts

        sampled = generated_texts(
            weights("compress option 'generated_samples'"),
            opts.generated_samples,
            tokens=opts.max_length,
        )
        texts = with_generated(load_texts(data, opts.text_column, samples), sampled)
        samples = len(texts)
    stats = collect_statistics(
        model,
        texts,
        tokenizer=tokenizer,
        text_column=opts.text_column,
        max_samples=samples,
        max_length=opts.max_length,
        batch_size=opts.batch_size,
        holdout=opts.shrinkage == "auto" or opts.blend == "auto",
        ray_address=opts.ray_address,
    )
    if opts.blending:
        # under loss_aware the output Fisher is blended too (not a full output Gram: that stays
        # the calibration data's own, see compression.blended_statistics)
        blend_fisher = opts.loss_aware and not opts.output_gram
        generic = generic_statistics(
            model,
            tokenizer=tokenizer,
            max_length=opts.max_length,
            batch_size=opts.batch_size,
            fisher_weights=weights("compress option 'loss_aware'") if blend_fisher else None,
            fisher_task=opts.fisher_task,
        )
        stats.gram_generic, stats.generic_tokens = generic.gram, generic.tokens
        stats.output_fisher_generic = generic.output_fisher_generic
    if opts.loss_aware:
        collect = collect_output_gram if opts.output_gram else collect_output_fisher
        table = collect(
            weights("compress option 'loss_aware'"),
            model,
            texts,
            task=opts.fisher_task,
            text_column=opts.text_column,
            label_column=label_column,
            labels=labels,
            max_samples=_gradient_samples(opts, samples),
            max_length=opts.max_length,
        )
        if opts.output_gram:
            stats.output_gram = table
        else:
            stats.output_fisher = table
    return stats
