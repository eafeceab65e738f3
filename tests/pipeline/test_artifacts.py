"""Stage caching: same key reuses, new key reruns, an interrupted stage leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from factorlm.pipeline.artifacts import ArtifactStore, hash_files, hash_json


def _writer(calls: list[str], text: str):  # type: ignore[no-untyped-def]
    def build(tmp: Path) -> dict[str, str]:
        calls.append(text)
        (tmp / "out.txt").write_text(text)
        return {"text": text}

    return build


def test_same_key_is_skipped_and_a_new_key_reruns(tmp_path: Path) -> None:
    calls: list[str] = []
    store = ArtifactStore(tmp_path)
    first = store.run("stage", hash_json({"a": 1}), _writer(calls, "one"))
    assert not first.skipped and (first.path / "out.txt").read_text() == "one"

    again = ArtifactStore(tmp_path).run("stage", hash_json({"a": 1}), _writer(calls, "two"))
    assert again.skipped and again.info == {"text": "one"}
    assert calls == ["one"]

    changed = ArtifactStore(tmp_path).run("stage", hash_json({"a": 2}), _writer(calls, "three"))
    assert not changed.skipped and (changed.path / "out.txt").read_text() == "three"


def test_interrupted_stage_leaves_no_artifact_and_reruns(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)

    def interrupted(tmp: Path) -> None:
        (tmp / "half.txt").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.run("stage", "k", interrupted)
    assert not (tmp_path / "stage").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "manifest.json"] == []

    calls: list[str] = []
    result = ArtifactStore(tmp_path).run("stage", "k", _writer(calls, "ok"))
    assert not result.skipped and calls == ["ok"]


def test_hash_files_sees_content_changes(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"123")
    before = hash_files([tmp_path])
    (tmp_path / "a.bin").write_bytes(b"124")
    assert hash_files([tmp_path]) != before
