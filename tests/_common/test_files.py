"""The one home of file plumbing: hashes, atomic writes, staged folders, sidecars, cache, versions."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from factorlm._common import files
from factorlm._common.files import (
    SIDECAR_FILES,
    cache_root,
    copy_sidecars,
    sha256_bytes,
    sha256_file,
    staged_directory,
    versions,
    write_bytes_atomic,
    write_text_atomic,
)
from factorlm.errors import ModelLoadError


def test_sha256_of_files_and_bytes_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks and a partial one
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == expected
    assert sha256_file(path, chunk=1000) == expected
    assert sha256_bytes(data) == expected
    assert sha256_bytes("héllo") == hashlib.sha256("héllo".encode()).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_atomic_write_replaces_with_usual_permissions(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "report.json"
    write_text_atomic(target, "first ü\n")
    assert target.read_bytes() == "first ü\n".encode()
    write_bytes_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "plan.json"
    target.write_text("old")

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(tmp_path / "ascii.txt", "ü", encoding="ascii")
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_staged_directory_renames_into_place_and_replaces_an_old_output(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    with staged_directory(out) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".engine.")
        assert not out.exists()
        (stage / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"
    with staged_directory(out) as stage:
        (stage / "b.txt").write_text("2")
    assert sorted(os.listdir(out)) == [".factorlm-owned", "b.txt"]  # the own-marker, and b
    assert sorted(os.listdir(tmp_path)) == ["engine"]  # no stage, no moved-aside copy


def test_staged_directory_is_removed_on_an_exception_and_the_old_output_kept(
    tmp_path: Path,
) -> None:
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)), staged_directory(out) as stage:
            (stage / "half.txt").write_text("half")
            raise error
        assert sorted(os.listdir(tmp_path)) == ["engine"]
        assert sorted(os.listdir(out)) == ["keep.txt"]


def test_staged_directory_replaces_an_unmarked_folder_that_publish_refuses(
    tmp_path: Path,
) -> None:
    """staged_directory is staged_output without the own-marker check: its callers checked the
    output themselves (asset folders predate the marker); a failed rename restores the old one."""
    from factorlm._common.outputs import staged_output
    from factorlm.errors import ConfigError

    out = tmp_path / "asset"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with (
        pytest.raises(ConfigError, match="not created by factorlm"),
        staged_output(out, "build") as stage,
    ):
        (stage / "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["asset"] and os.listdir(out) == ["old.txt"]
    real_replace = os.replace

    def failing(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == out and Path(src).parent == tmp_path and Path(src).name != "asset":
            raise OSError("rename failed")
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", failing)
        with pytest.raises(OSError, match="rename failed"), staged_directory(out) as stage:
            (stage / "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["asset"] and os.listdir(out) == ["old.txt"]
    with staged_directory(out) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == [".factorlm-owned", "new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["asset"]


def _model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder / "config.json").write_text("{}")
    (folder / "notes.md").write_text("not a sidecar")
    return folder


def test_copy_sidecars_copies_known_regular_files_only(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    (folder / "real_vocab.txt").write_text("a\nb\n")
    (folder / "vocab.txt").symlink_to("real_vocab.txt")  # a link inside the folder is fine
    (folder / "tokenizer.json").mkdir()  # not a regular file: skipped
    out = tmp_path / "out"
    out.mkdir()
    for source in (folder, folder / "model.onnx"):  # the folder or a file in it
        for old in out.iterdir():
            old.unlink()
        assert copy_sidecars(source, out) == ["config.json", "vocab.txt"]
        assert (out / "vocab.txt").read_text() == "a\nb\n"
        assert not (out / "vocab.txt").is_symlink()  # the copy is a plain file
    (out / "config.json").write_text('{"mine": 1}')
    assert copy_sidecars(folder, out, skip_existing=True) == []
    assert (out / "config.json").read_text() == '{"mine": 1}'
    assert {"config.json", "tokenizer.json", "vocab.txt", "merges.txt"} <= set(SIDECAR_FILES)


def test_a_sidecar_symlink_escaping_the_folder_is_refused_and_nothing_copied(
    tmp_path: Path,
) -> None:
    folder = _model_folder(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    (folder / "vocab.txt").symlink_to(secret)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelLoadError, match=r"vocab\.txt is a symlink to .*outside") as info:
        copy_sidecars(folder, out)
    assert "\n" not in str(info.value)
    assert list(out.iterdir()) == []  # config.json, checked first, was not copied either
    (folder / "vocab.txt").unlink()
    (folder / "vocab.txt").symlink_to(Path("..") / "model" / "config.json")  # ../ but inside
    assert copy_sidecars(folder, out) == ["config.json", "vocab.txt"]


def test_a_hugging_face_cache_snapshot_may_link_into_its_blobs(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("{}")
    snapshot = repo / "snapshots" / "0123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(Path("../../blobs/abc123"))
    out = tmp_path / "out"
    out.mkdir()
    assert copy_sidecars(snapshot, out) == ["config.json"]
    assert (out / "config.json").read_text() == "{}"


def test_cache_root_prefers_argument_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACTORLM_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("FACTORLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "factorlm"


def test_versions_come_from_metadata_without_importing_torch() -> None:
    import subprocess

    code = (
        "import sys; from factorlm._common.files import versions; v = versions(); "
        "print(sorted(v)); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    found = versions()
    for name in ("python", "platform", "factorlm", "onnx", "onnxruntime", "numpy"):
        assert found[name], name
    import onnx

    assert found["onnx"] == onnx.__version__
