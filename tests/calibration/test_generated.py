"""Calibration text sampled by the causal LM itself (tiny random Llama, real transformers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from factorlm.calibration.generated import generated_texts, with_generated
from factorlm.errors import ConfigError


def test_sampled_texts_are_seeded_cached_and_new_tokens_only(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    first = generated_texts(tiny_llama_dir, 3, tokens=8, batch_size=2, cache_dir=tmp_path)
    assert len(first) == 3 and len(set(first)) > 1  # sampled, not one greedy text
    assert list(tmp_path.glob("generated-*.json"))
    again = generated_texts(tiny_llama_dir, 3, tokens=8, batch_size=2, cache_dir=tmp_path / "x")
    assert again == first  # the seed fixes the samples, cache or not
    other = generated_texts(tiny_llama_dir, 3, tokens=8, seed=1, cache_dir=tmp_path)
    assert other != first
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for text in first:  # 8 new tokens each, give or take re-tokenization of the decoded text
        assert 4 <= len(tok(text, add_special_tokens=False)["input_ids"]) <= 12


def test_only_a_causal_lm_writes_its_own_text(tiny_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a causal LM"):
        generated_texts(tiny_bert_dir, 2, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=">= 1"):
        generated_texts(tiny_bert_dir, 0, cache_dir=tmp_path)


def test_with_generated_interleaves_and_keeps_everything() -> None:
    assert with_generated(["a", "b", "c"], ["x"]) == ["a", "x", "b", "c"]
    assert with_generated(["a"], ["x", "y"]) == ["a", "x", "y"]
