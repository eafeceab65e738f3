"""Stage caching: same key reuses, new key reruns, an interrupted stage leaves nothing behind."""

from __future__ import annotations

import os
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


def test_failed_publish_keeps_the_previous_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between moving the old stage folder aside and renaming the new one into place
    puts the old one back (the old code deleted it first, so it was lost)."""
    calls: list[str] = []
    store = ArtifactStore(tmp_path)
    store.run("stage", "k1", _writer(calls, "old"))
    real_replace = os.replace

    def failing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src).name.startswith(".tmp-stage.") and Path(dst) == tmp_path / "stage":
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        store.run("stage", "k2", _writer(calls, "new"), force=True)
    monkeypatch.undo()
    assert calls == ["old", "new"]
    assert (tmp_path / "stage" / "out.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "stage"]
    again = ArtifactStore(tmp_path).run("stage", "k1", _writer(calls, "unused"))
    assert again.skipped and (again.path / "out.txt").read_text() == "old"
