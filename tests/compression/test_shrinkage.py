"""Calibration that generalizes: held-back Grams, shrinkage chosen by their likelihood, and the
warning for a calibration set too small for the widths it must whiten (tiny exported Llama)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import factorlm
from factorlm.calibration import CalibrationStats, collect_statistics
from factorlm.calibration.capture import HOLDOUT_EVERY
from factorlm.compression import shrunk_statistics
from factorlm.decompose import shrink_gram
from factorlm.errors import ConfigError
from tiny_vocab import LONG_TEXTS

TEXTS = LONG_TEXTS * 6


def test_held_back_gram_is_the_gram_of_every_fourth_batch(
    tiny_llama_past: Path, tmp_path: Path
) -> None:
    batch, texts = 3, TEXTS * 3  # the held-back quarter alone must outnumber 128 features
    stats = collect_statistics(
        tiny_llama_past, texts, max_length=16, batch_size=batch, holdout=True,
        cache_dir=tmp_path, progress=False,
    )  # fmt: skip
    held_texts = [
        t
        for i in range(0, len(texts), batch)
        if (i // batch) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        for t in texts[i : i + batch]
    ]
    alone = collect_statistics(
        tiny_llama_past, held_texts, max_length=16, batch_size=batch, max_samples=len(held_texts),
        cache_dir=tmp_path, progress=False,
    )  # fmt: skip
    assert stats.heldout_tokens == alone.tokens
    assert 0 < stats.heldout_tokens < stats.tokens
    assert set(stats.gram_heldout) == set(stats.gram)
    for name, gram in alone.gram.items():
        np.testing.assert_allclose(stats.gram_heldout[name], gram, rtol=1e-9, atol=1e-9)
    # The held-back part survives a save/load round trip.
    again = CalibrationStats.load(stats.save(tmp_path / "s.npz"))
    assert again.heldout_tokens == stats.heldout_tokens
    name = next(iter(stats.gram))
    np.testing.assert_array_equal(again.gram_heldout[name], stats.gram_heldout[name])


def _random_texts(count: int) -> list[str]:
    from tiny_vocab import WORDS

    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=12)) for _ in range(count)]


def test_shrinkage_auto_shrinks_a_small_calibration_set(
    tiny_llama_past: Path, tmp_path: Path
) -> None:
    texts = _random_texts(48)  # held-back batches differ from the rest
    stats = collect_statistics(
        tiny_llama_past, texts, max_length=16, batch_size=3, holdout=True, cache_dir=tmp_path,
        max_samples=len(texts), progress=False,
    )  # fmt: skip
    shrunk = shrunk_statistics(stats)
    changed = 0
    for name, gram in stats.gram.items():
        new = shrunk.gram[name]
        np.testing.assert_allclose(np.diag(new), np.diag(gram))  # the diagonal is kept
        if not np.allclose(new, gram):
            changed += 1
            off = ~np.eye(gram.shape[0], dtype=bool)
            ratio = new[off] / np.where(gram[off] == 0, 1, gram[off])
            alpha = 1 - np.median(ratio[gram[off] != 0])
            np.testing.assert_allclose(new, shrink_gram(gram, alpha), rtol=1e-9, atol=1e-12)
    # a few hundred tokens of a 60-word vocabulary cannot pin down 64- to 128-wide correlations
    assert changed >= 1
    assert stats.gram is not shrunk.gram  # the input statistics are left alone


def test_shrinkage_auto_needs_a_held_back_part(tiny_llama_past: Path, tmp_path: Path) -> None:
    stats = collect_statistics(
        tiny_llama_past, TEXTS, max_length=16, batch_size=3, cache_dir=tmp_path, progress=False
    )
    with pytest.raises(ConfigError, match="held-back part"):
        factorlm.compress(tiny_llama_past, tmp_path / "o.onnx", stats=stats, shrinkage="auto")
    assert not (tmp_path / "o.onnx").exists()


def test_compress_with_shrinkage_collects_its_own_held_back_part(
    tiny_llama_past: Path, tmp_path: Path
) -> None:
    data = tmp_path / "calib.json"
    data.write_text(json.dumps([{"text": t} for t in TEXTS]))
    result = factorlm.compress(
        tiny_llama_past, tmp_path / "out" / "model.onnx", data=data, shrinkage="auto",
        calibration_samples=len(TEXTS), max_length=16, batch_size=3, min_size=256,
    )  # fmt: skip
    assert result.factorized > 0


def test_too_few_tokens_per_feature_warns(
    tiny_llama_past: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="factorlm.calibration.capture"):
        collect_statistics(
            tiny_llama_past, TEXTS[:24], max_length=16, batch_size=4, cache_dir=tmp_path,
            progress=False,
        )  # fmt: skip
    assert any("per feature" in r.getMessage() for r in caplog.records)
