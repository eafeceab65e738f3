"""The mixed-genre calibration set: deterministic, alternating genres, no evaluation novel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factorlm.assets.mixed import MIXED_NOVELS, mixed_calibration_texts, resolve_mixed
from factorlm.errors import DataError


@pytest.fixture(scope="module")
def texts() -> list[str]:
    try:
        return mixed_calibration_texts(16)
    except DataError as exc:  # the assets are prepared by .ci/run and the README's command
        pytest.skip(str(exc))


def test_alternates_novels_and_reviews(texts: list[str]) -> None:
    from factorlm.assets import austen_dir, reviews_path

    assert len(texts) == 16 and texts == mixed_calibration_texts(16)
    novels = {n: (austen_dir() / f"{n}.txt").read_text(encoding="utf-8") for n in MIXED_NOVELS}
    flat = {n: " ".join(t.split()) for n, t in novels.items()}
    reviews = reviews_path().read_text(encoding="utf-8")
    for i, text in enumerate(texts):
        assert 1000 <= len(text) <= 1400
        head = text[:80]
        in_novel = any(head in t for t in flat.values())
        assert in_novel == (i % 2 == 0)
        if i % 2:
            assert json.dumps(text.split(". ")[0][:40])[1:-1][:20] in reviews
    # the evaluation and in-domain novels of the benchmarks are not in it
    for held in ("prideprejudice", "persuasion", "emma"):
        body = " ".join((austen_dir() / f"{held}.txt").read_text(encoding="utf-8").split())
        assert not any(t[200:260] in body for t in texts[::2])


def test_resolve_mixed_writes_a_jsonl_once(texts: list[str], tmp_path: Path) -> None:
    path = resolve_mixed(Path("mixed"), tmp_path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 64 and rows[0]["text"] == texts[0]
    stamp = path.stat().st_mtime_ns
    assert resolve_mixed(Path("mixed"), tmp_path) == path and path.stat().st_mtime_ns == stamp
    other = tmp_path / "mine.jsonl"
    assert resolve_mixed(other, tmp_path) == other  # any other path is the user's own file
