"""A mixed-genre calibration set built from the prepared assets: novels and review snippets.

Why: data-aware factorization fits the statistics of whatever text it calibrates on. A user often
has only one genre at hand; a calibration set that mixes narrative prose (three Austen novels)
with short modern opinion (Rotten Tomatoes snippets) fits no single genre's correlations, so it is
the default a decoder can be compressed with when nothing better is known (``--data mixed``).
*Pride and Prejudice*, *Persuasion* and *Emma* are left out: factorlm's benchmarks evaluate,
tune and calibrate in-domain on them.

Records alternate between the genres; each is about ``chars`` characters (about 256 tokens of a
BPE tokenizer at 1,200), cut at whitespace so no word is split.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from factorlm.assets.paths import austen_dir, reviews_path

__all__ = ["MIXED_NAME", "MIXED_NOVELS", "mixed_calibration_texts", "resolve_mixed"]

logger = logging.getLogger(__name__)

#: What ``--data`` accepts for this set.
MIXED_NAME = "mixed"
MIXED_NOVELS = ("mansfieldpark", "northangerabbey", "sensesensibility")


def _cut(text: str, chars: int) -> list[str]:
    """``text`` in pieces of about ``chars`` characters, each ending at whitespace."""
    words = text.split()
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for word in words:
        current.append(word)
        size += len(word) + 1
        if size >= chars:
            pieces.append(" ".join(current))
            current, size = [], 0
    return pieces


def mixed_calibration_texts(count: int = 64, chars: int = 1200) -> list[str]:
    """``count`` records alternating novel excerpts and joined review snippets (deterministic).

    Novel excerpts are spread evenly over the three novels (from the start of each); review
    records join consecutive snippets of the shuffled reviews file.
    """
    novels = [
        _cut((austen_dir() / f"{n}.txt").read_text(encoding="utf-8"), chars) for n in MIXED_NOVELS
    ]
    reviews: list[str] = []
    with reviews_path().open(encoding="utf-8") as handle:
        snippets = (json.loads(line)["text"].strip() for line in handle)
        reviews = _cut(
            " ".join(s for _, s in zip(range(count * chars // 60), snippets, strict=False)), chars
        )
    prose = [novel[i] for i in range(count) for novel in novels if i < len(novel)]
    texts: list[str] = []
    for i in range(count):
        source = prose if i % 2 == 0 else reviews
        index = i // 2
        if index < len(source):
            texts.append(source[index])
    return texts


def resolve_mixed(data: Path, folder: Path) -> Path:
    """``data`` itself, or for ``mixed`` (no such file) a JSONL of the mixed set in ``folder``."""
    if str(data) != MIXED_NAME or data.exists():
        return data
    path = folder / "mixed-calibration.jsonl"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"text": t}) + "\n" for t in mixed_calibration_texts())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(lines, encoding="utf-8")
        tmp.replace(path)
    logger.info("Calibrating on factorlm's mixed-genre set %s", path)
    return path
