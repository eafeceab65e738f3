"""The tiny word-level vocabulary and tokenizer the test models share, and data written over it.

A plain module (not conftest.py) so test files can import it: ``from conftest import ...``
resolves to whichever conftest.py pytest loaded last (tests/bench/ has its own).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

WORDS = [
    "the",
    "film",
    "is",
    "a",
    "good",
    "bad",
    "movie",
    "plot",
    "great",
    "awful",
    "quiet",
    "loud",
    "story",
    "actor",
    "funny",
    "sad",
    "long",
    "short",
    "best",
    "worst",
    "boring",
    "clever",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]

#: Sentences over WORDS (recovery tests train on them).
TEXTS = [
    "the film is a good movie",
    "a bad plot and an awful actor",
    "the story is funny and clever",
    "long boring sad movie",
    "the best actor in the worst film",
    "a quiet short story",
    "loud awful movie the plot is bad",
    "great film great story",
]

#: Six longer review-like sentences the tiny decoder tests calibrate on (repeat them for volume).
LONG_TEXTS = [
    "the film is a good movie and the story is long",
    "bad plot but the actor is funny",
    "the best story is a quiet story",
    "a long long long boring film with a sad ending",
    "great clever movie",
    "the worst plot and the worst actor",
]


def write_tokenizer(folder: Path, vocab: list[str] | None = None, *, decoder: bool = False) -> Path:
    """Write a word-level tokenizer (tokenizer.json + tokenizer_config.json) into ``folder``.

    ``vocab`` defaults to SPECIALS + WORDS. Encoder style wraps a text in [CLS] ... [SEP];
    ``decoder`` style adds no special tokens (a decoder's prompt), decodes ids back to words and
    names [CLS]/[SEP] its bos/eos.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    ids = {tok: i for i, tok in enumerate(vocab or SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=ids, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
    }
    if decoder:
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        config |= {"bos_token": "[CLS]", "eos_token": "[SEP]", "model_max_length": 128}
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
        )
        config |= {"cls_token": "[CLS]", "sep_token": "[SEP]", "model_max_length": 64}
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def write_reviews(path: Path, rows: int = 120) -> Path:
    """``rows`` JSON lines ``{text, label}`` of 3-12 of the first ten WORDS (seeded, so the same file
    every time) with neg/pos labels alternating: the data file of the pipeline and sweep tests."""
    rng = random.Random(0)
    with path.open("w") as handle:
        for i in range(rows):
            words = " ".join(rng.choice(WORDS[:10]) for _ in range(rng.randint(3, 12)))
            handle.write(
                json.dumps({"text": f"{words} {i}", "label": ["neg", "pos"][i % 2]}) + "\n"
            )
    return path


def review_job(model: Path) -> dict[str, Any]:
    """A run config over ``reviews.jsonl`` (``write_reviews``) small enough for every stage of
    ``factorlm run`` to take seconds on a tiny model."""
    return {
        "model": str(model),
        "data": {
            "path": "reviews.jsonl",
            "labels": ["neg", "pos"],
            "calibration_samples": 40,
            "eval_samples": 60,
        },
        "calibration": {"max_length": 16, "batch_size": 8},
        "compress": {"method": "whiten", "ratio": 0.7, "rank_multiple": 2, "min_size": 64},
        "benchmark": {"shapes": ["1x16"], "warmup": 1, "iterations": 5},
    }
