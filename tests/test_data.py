"""Reading texts and labels from JSONL, JSON, CSV, TXT and folders; one-sentence errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factorlm.data import iter_records, read_corpus, read_labelled, read_texts, texts_digest
from factorlm.errors import DataError


def test_formats(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        '{"text": "one", "label": "fresh"}\n\n{"text": "  ", "label": "x"}\n'
        '{"text": "two", "label": "rotten"}\n'
    )
    (tmp_path / "b.json").write_text(json.dumps([{"text": "three", "label": 1}]))
    (tmp_path / "c.csv").write_text('text,label\n"four, with comma",fresh\n"five\nlines",plot\n')
    (tmp_path / "d.txt").write_text("Para one\nwrapped.\n\n\nPara two.\n")
    assert read_texts(tmp_path / "a.jsonl") == ["one", "two"]  # blank text skipped
    assert read_labelled(tmp_path / "b.json") == (["three"], ["1"])
    assert read_texts(tmp_path / "c.csv") == ["four, with comma", "five\nlines"]
    # TXT: one record per non-empty line, under whatever text column was asked for
    assert read_texts(tmp_path / "d.txt") == ["Para one", "wrapped.", "Para two."]
    assert read_texts(tmp_path / "d.txt", text_column="body") == [
        "Para one",
        "wrapped.",
        "Para two.",
    ]
    # perplexity reads a TXT file's exact text; skipping rows keeps the rest disjoint
    assert read_corpus(tmp_path / "d.txt") == "Para one\nwrapped.\n\n\nPara two.\n"
    assert read_corpus(tmp_path / "d.txt", skip_rows=1) == "wrapped.\nPara two."
    assert read_corpus(tmp_path / "a.jsonl") == "one\n\ntwo"
    # a JSON array is accepted whatever the suffix, like JSON lines
    (tmp_path / "arr.jsonl").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert read_texts(tmp_path / "arr.jsonl") == ["x", "y"]
    # U+2028 inside a JSON string is not a line break
    (tmp_path / "u.jsonl").write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n")
    assert read_texts(tmp_path / "u.jsonl") == ["a\u2028b"]
    texts, labels = read_labelled(tmp_path / "a.jsonl", labels=["rotten"])
    assert (texts, labels) == (["two"], ["rotten"])
    assert read_texts(tmp_path / "a.jsonl", max_samples=1) == ["one"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.jsonl").write_text('{"text": "x"}\n')
    (folder / "y.txt").write_text("y\n")
    assert read_texts(folder) == ["x", "y"]
    assert texts_digest(["ab", "c"]) != texts_digest(["a", "bc"])


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_texts(tmp_path / "missing.jsonl")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no non-empty texts in column 'text'"):
        read_texts(tmp_path / "e.jsonl")
    (tmp_path / "c.csv").write_text("body\nhello\n")
    with pytest.raises(DataError, match=r"has no column 'text' \(its columns: body\)"):
        read_texts(tmp_path / "c.csv")
    (tmp_path / "l.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match="no column 'label'"):
        read_labelled(tmp_path / "l.jsonl")
    (tmp_path / "gap.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match="record without a 'label' label"):
        read_labelled(tmp_path / "gap.jsonl")  # never a silent "None" class
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        list(iter_records(tmp_path / "bad.jsonl"))
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="unsupported extension"):
        read_texts(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="at least 1"):
        read_texts(tmp_path / "l.jsonl", max_samples=0)


@pytest.mark.slow
def test_real_reviews_asset() -> None:
    from factorlm.assets import reviews_path

    texts, labels = read_labelled(reviews_path(), labels=["fresh", "rotten"], max_samples=400)
    assert len(texts) == 400
    assert 0.3 < labels.count("fresh") / 400 < 0.8  # shuffled: both classes early in the file
