"""The tiny word-level vocabulary and tokenizer the test models share.

A plain module (not conftest.py) so test files can import it: ``from conftest import ...``
resolves to whichever conftest.py pytest loaded last (tests/bench/ has its own).
"""

from __future__ import annotations

import json
from pathlib import Path

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


def write_tokenizer(folder: Path) -> Path:
    """Write a word-level tokenizer (tokenizer.json + tokenizer_config.json) into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "model_max_length": 64,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
