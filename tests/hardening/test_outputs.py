"""Unit tests of the checked output and user-file helpers (``factorlm._common``)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from factorlm._common.outputs import (
    MARKER,
    Terminated,
    check_output,
    clean_stale,
    is_owned,
    make_stage,
    mark_owned,
    remove_owned,
    sigterm_as_interrupt,
    staged_output,
)
from factorlm._common.userfiles import iter_csv_rows, iter_lines, parse_json, read_json
from factorlm.errors import ConfigError, DataError, ModelLoadError


def test_check_output_refuses_inputs_and_foreign_folders(tmp_path: Path) -> None:
    model = tmp_path / "in" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(b"x")
    with pytest.raises(ConfigError, match="is the input"):
        check_output(model, inputs=[model], kind="file", overwrite=True)
    with pytest.raises(ConfigError, match="is the input"):
        check_output(tmp_path / "o.onnx", inputs=[model], kind="file", companions=[model])
    with pytest.raises(ConfigError, match="contains the input"):
        check_output(tmp_path, inputs=[model], overwrite=True)
    with pytest.raises(ConfigError, match="inside the input folder"):
        check_output(tmp_path / "in" / "sub", inputs=[model.parent])
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output(model / "x", inputs=[])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "Makefile").write_text("all:\n")
    with pytest.raises(ConfigError, match="pass --overwrite"):
        check_output(foreign)
    with pytest.raises(ConfigError, match="not created by factorlm"):
        check_output(foreign, overwrite=True)
    mark_owned(foreign, "build")
    assert check_output(foreign, overwrite=True) == foreign


def test_remove_owned_only_removes_marked_folders(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for folder in (mine, theirs):
        folder.mkdir()
        (folder / "f").write_text("x")
    mark_owned(mine, "run")
    (theirs / MARKER).write_text("not json")  # a fake marker is not ours
    remove_owned(mine)
    assert not mine.exists()
    with pytest.raises(ConfigError, match="not created by factorlm"):
        remove_owned(theirs)
    assert (theirs / "f").read_text() == "x"


def test_clean_stale_removes_dead_stages_only(tmp_path: Path) -> None:
    dead = make_stage(tmp_path, "out", "build")
    record = json.loads((dead / MARKER).read_text())
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    record["pid"] = int(proc.stdout)  # a process that has exited
    (dead / MARKER).write_text(json.dumps(record))
    alive = make_stage(tmp_path, "out", "build")  # ours: this process runs
    unmarked = tmp_path / ".out.abc.tmp"
    unmarked.mkdir()
    assert clean_stale(tmp_path, "out") == [dead]
    assert alive.is_dir() and unmarked.is_dir()


def test_staged_output_publishes_or_removes(tmp_path: Path) -> None:
    out = tmp_path / "eng"
    with pytest.raises(RuntimeError), staged_output(out, "build") as stage:
        (stage / "model.onnx").write_text("half")
        raise RuntimeError
    assert not out.exists() and os.listdir(tmp_path) == []
    with staged_output(out, "build") as stage:
        (stage / "model.onnx").write_text("full")
    assert is_owned(out) and (out / "model.onnx").read_text() == "full"
    assert sorted(os.listdir(tmp_path)) == ["eng"]


def test_sigterm_becomes_an_interrupt() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
    assert signal.getsignal(signal.SIGTERM) == previous


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b'{"a": "\xff"}', "byte offset 7"),
        (b"[" * 5000 + b"]" * 5000, "deeper than 64"),
        (b"[" * 70 + b"]" * 70, "deeper than 64"),
        (b"{oops", "not valid JSON"),
    ],
)
def test_read_json_refuses_in_one_sentence(tmp_path: Path, data: bytes, match: str) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=match) as info:
        read_json(path, what="plan")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_lines_and_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    big = "x" * 300_000  # over the stdlib's 128 KiB field limit
    path.write_text(f'text,label\n"{big}",1\n"two\nlines",0\n', encoding="utf-8")
    rows = list(iter_csv_rows(path, error=DataError))
    assert [len(r["text"]) for r in rows] == [300_000, 9]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nnot \xc3\x28 fine\n")
    with pytest.raises(DataError, match="byte offset 9"):
        list(iter_lines(bad, error=DataError))
    assert parse_json("[1, 2]", source="x") == [1, 2]


def test_checkpoint_rng_state_is_plain_and_planted_pickle_refused(tmp_path: Path) -> None:
    from factorlm.recovery.checkpoint import (
        load_checkpoint,
        rng_state,
        save_checkpoint,
        set_rng_state,
    )

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rng_state()
    payload = {
        "config": {}, "student": {}, "optimizer": {}, "method_state": {}, "step": 0,
        "seconds": 0.0, "losses": [], "rng": state,
    }  # fmt: skip
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(load_checkpoint(tmp_path / "checkpoint.pt")["rng"], tmp_path)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, (f"touch {marker}",))

    torch.save({**payload, "student": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="could run code"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_stage_interrupted_while_being_marked_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM (Terminated) between creating a stage and marking it leaves no folder behind."""
    from factorlm._common import outputs

    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise outputs.Terminated

    monkeypatch.setattr(outputs, "mark_owned", interrupted)
    with pytest.raises(outputs.Terminated):
        outputs.make_stage(tmp_path, "m.onnx", "compress")
    assert list(tmp_path.iterdir()) == []


def test_remove_stage_finishes_when_interrupted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt inside the first rmtree still ends with the stage gone (then propagates)."""
    import shutil

    from factorlm._common import outputs

    stage = outputs.make_stage(tmp_path, "m.onnx", "save")
    (stage / "model.onnx").write_bytes(b"x" * 10)
    real_rmtree = shutil.rmtree
    calls: list[int] = []

    def flaky(path: object, ignore_errors: bool = False) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise outputs.Terminated
        real_rmtree(path, ignore_errors=ignore_errors)  # type: ignore[arg-type]

    monkeypatch.setattr(outputs.shutil, "rmtree", flaky)
    with pytest.raises(outputs.Terminated):
        outputs.remove_stage(stage)
    assert not stage.exists() and len(calls) == 2
