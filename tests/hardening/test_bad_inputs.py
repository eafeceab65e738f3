"""A corpus of bad and hostile inputs, one line each, across every command.

Each case runs the CLI in-process (``factorlm.cli.main``) on a private copy of the world built in
conftest and asserts the README's promise: exit status 2, exactly one line on stderr, every
file under the test folder byte-identical afterwards (so inputs are untouched and nothing is
left in the output location), and no code run (hostile payloads would create ``PWNED``).

A new case is one ``Case(...)`` line: an id, the argv (``{w}`` = the world folder, ``{o}`` = an
output path that does not exist yet, ``{x}`` = the marker a payload would write) and optional
setup steps that plant the bad input before the snapshot is taken.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from hardening.tree import snapshot

Setup = Callable[[Path, Path], None]  # (world, marker) -> None


class _Payload:
    """Unpickling this runs ``touch MARKER``: the marker proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


# ---------------------------------------------------------------- setup steps (planters)


def write(name: str, data: bytes | str) -> Setup:
    def step(w: Path, x: Path) -> None:
        path = w / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return step


def sparse(name: str, size: int) -> Setup:
    def step(w: Path, x: Path) -> None:
        with open(w / name, "wb") as handle:
            handle.truncate(size)

    return step


def copy(src: str, dst: str) -> Setup:
    def step(w: Path, x: Path) -> None:
        (w / dst).parent.mkdir(parents=True, exist_ok=True)
        if (w / src).is_dir():
            shutil.copytree(w / src, w / dst, symlinks=True)
        else:
            shutil.copy(w / src, w / dst)

    return step


def remove(name: str) -> Setup:
    return lambda w, x: (w / name).unlink()


def link(name: str, target: str) -> Setup:
    return lambda w, x: (w / name).symlink_to(target)


def mkdir(name: str) -> Setup:
    return lambda w, x: (w / name).mkdir(parents=True, exist_ok=True)


def pickled(name: str, *, torch_save: bool = False) -> Setup:
    def step(w: Path, x: Path) -> None:
        (w / name).parent.mkdir(parents=True, exist_ok=True)
        if torch_save:
            import torch

            torch.save({"student": _Payload(x)}, w / name)
        else:
            (w / name).write_bytes(pickle.dumps(_Payload(x)))

    return step


def evil_npz(name: str) -> Setup:
    def step(w: Path, x: Path) -> None:
        arr = np.empty(1, dtype=object)
        arr[0] = _Payload(x)
        np.savez(w / name, gram=arr)

    return step


def marker_file(folder: str) -> Setup:
    """A valid factorlm own-marker, so the folder counts as factorlm's."""

    def step(w: Path, x: Path) -> None:
        (w / folder).mkdir(parents=True, exist_ok=True)
        (w / folder / ".factorlm-owned").write_text(
            json.dumps({"tool": "factorlm", "command": "recover", "pid": 1, "host": "elsewhere"})
        )

    return step


def plan_edit(fn: Callable[[dict[str, Any]], None], name: str = "bad.plan.json") -> Setup:
    def step(w: Path, x: Path) -> None:
        data = json.loads((w / "plan.json").read_text())
        fn(data)
        (w / name).write_text(json.dumps(data))

    return step


def _first(data: dict[str, Any]) -> dict[str, Any]:
    return next(iter(data["weights"].values()))


def _rename_first(data: dict[str, Any]) -> None:
    key = next(iter(data["weights"]))
    data["weights"]["no_such_weight"] = data["weights"].pop(key)


def model_edit(fn: Callable[[onnx.ModelProto], None], name: str = "bad.onnx") -> Setup:
    def step(w: Path, x: Path) -> None:
        model = onnx.load(str(w / "model.onnx"))
        fn(model)
        onnx.save(model, str(w / name))

    return step


def ext_edit(fn: Callable[[onnx.ModelProto], None]) -> Setup:
    """Edit the external-data entries of ``ext/model.onnx`` (saved as ``ext/bad.onnx``)."""

    def step(w: Path, x: Path) -> None:
        model = onnx.load(str(w / "ext" / "model.onnx"), load_external_data=False)
        fn(model)
        (w / "ext" / "bad.onnx").write_bytes(model.SerializeToString())

    return step


def _set_ext(key: str, value: str) -> Callable[[onnx.ModelProto], None]:
    def fn(model: onnx.ModelProto) -> None:
        tensor = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        entries = {e.key: e for e in tensor.external_data}
        if key in entries:
            entries[key].value = value
        else:
            tensor.external_data.add(key=key, value=value)

    return fn


def _nan(model: onnx.ModelProto) -> None:
    init = model.graph.initializer[0]
    arr = numpy_helper.to_array(init).copy()
    arr.flat[3] = np.nan
    init.CopyFrom(numpy_helper.from_array(arr, init.name))


def _duplicate(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(model.graph.initializer[0])


def _opset99(model: onnx.ModelProto) -> None:
    model.opset_import[0].version = 99


def _short_raw(model: onnx.ModelProto) -> None:
    init = model.graph.initializer[0]
    init.raw_data = init.raw_data[: len(init.raw_data) // 2]


def _dangling(model: onnx.ModelProto) -> None:
    model.graph.node[0].input[0] = "no_such_tensor"


def _bigger_rank(data: dict[str, Any]) -> None:
    _first(data)["shape"] = [65, 128]


def _deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


NOT_UTF8 = b'{"text": "caf\xe9 \xff"}\n'
LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)
PY_TAG = "model: !!python/object/apply:os.system ['touch {x}']\n"
RUN = "model: {w}/model.onnx\noutput_dir: {w}/runout\n"


# ---------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    id: str
    argv: str
    setup: tuple[Setup, ...] = ()
    code: int = 2


def C(id: str, argv: str, *setup: Setup, code: int = 2) -> Case:
    return Case(id, argv, setup, code)


COMPRESS = "compress --method svd --min-size 1 "
RECOVER = "recover {w}/hf --plan {w}/bert.plan.json --data {w}/data.jsonl --steps 2 "
BENCH = "bench -r {w}/model.onnx -c {w}/model.onnx --iterations 1 --warmup 0 "

CASES: list[Case] = [
    # compress: the model
    C("compress-missing-model", COMPRESS + "{w}/nope.onnx -o {o}/m.onnx"),
    C("compress-garbage-model", COMPRESS + "{w}/bad.onnx -o {o}/m.onnx", write("bad.onnx", b"no")),
    C("compress-empty-model", COMPRESS + "{w}/bad.onnx -o {o}/m.onnx", write("bad.onnx", b"")),
    C("compress-model-is-folder", COMPRESS + "{w}/hf -o {o}/m.onnx"),
    C("compress-nan-weight", COMPRESS + "{w}/bad.onnx -o {o}/m.onnx", model_edit(_nan)),
    C("compress-duplicate-init", COMPRESS + "{w}/bad.onnx -o {o}/m.onnx", model_edit(_duplicate)),
    C("compress-opset-99", COMPRESS + "{w}/bad.onnx -o {o}/m.onnx", model_edit(_opset99)),
    C("compress-raw-data-short", COMPRESS + "{w}/bad.onnx -o {o}/m.onnx", model_edit(_short_raw)),
    C("compress-dangling-input", COMPRESS + "{w}/bad.onnx -o {o}/m.onnx", model_edit(_dangling)),
    C(
        "compress-ext-escape",
        COMPRESS + "{w}/ext/bad.onnx -o {o}/m.onnx",
        ext_edit(_set_ext("location", "../model.onnx")),
    ),
    C(
        "compress-ext-absolute",
        COMPRESS + "{w}/ext/bad.onnx -o {o}/m.onnx",
        ext_edit(_set_ext("location", "/etc/hostname")),
    ),
    C(
        "compress-ext-length",
        COMPRESS + "{w}/ext/bad.onnx -o {o}/m.onnx",
        ext_edit(_set_ext("length", "16")),
    ),
    C(
        "compress-ext-offset",
        COMPRESS + "{w}/ext/bad.onnx -o {o}/m.onnx",
        ext_edit(_set_ext("offset", "99999999")),
    ),
    C(
        "compress-ext-missing",
        COMPRESS + "{w}/ext/model.onnx -o {o}/m.onnx",
        remove("ext/model.onnx.data"),
    ),
    C(
        "compress-ext-symlink",
        COMPRESS + "{w}/ext/model.onnx -o {o}/m.onnx",
        remove("ext/model.onnx.data"),
        link("ext/model.onnx.data", "/etc/hostname"),
    ),
    # compress: the output
    C("compress-out-parent-file", COMPRESS + "{w}/model.onnx -o {w}/data.txt/m.onnx"),
    C(
        "compress-out-is-plan",
        COMPRESS + "{w}/model.onnx -o {w}/plan.json --plan {w}/plan.json --overwrite",
    ),
    C("compress-out-is-input", COMPRESS + "{w}/model.onnx -o {w}/model.onnx --overwrite"),
    C(
        "compress-out-exists",
        COMPRESS + "{w}/model.onnx -o {w}/old.onnx",
        copy("model.onnx", "old.onnx"),
    ),
    C(
        "compress-ext-over-input-data",
        COMPRESS + "{w}/ext/orig.onnx -o {w}/ext/model.onnx --external-data --overwrite",
        copy("ext/model.onnx", "ext/orig.onnx"),
    ),
    C(
        "compress-plan-is-output-plan",
        COMPRESS + "{w}/model.onnx -o {w}/p.onnx --plan {w}/p.plan.json",
        copy("plan.json", "p.plan.json"),
    ),
    # compress: the plan
    C("plan-missing", COMPRESS + "{w}/model.onnx -o {o}/m.onnx --plan {w}/nope.json"),
    C(
        "plan-not-utf8",
        COMPRESS + "{w}/model.onnx -o {o}/m.onnx --plan {w}/bad.plan.json",
        write("bad.plan.json", b'{"format": "\xff"}'),
    ),
    C(
        "plan-deep",
        COMPRESS + "{w}/model.onnx -o {o}/m.onnx --plan {w}/bad.plan.json",
        write("bad.plan.json", _deep()),
    ),
    C(
        "plan-invalid-json",
        COMPRESS + "{w}/model.onnx -o {o}/m.onnx --plan {w}/bad.plan.json",
        write("bad.plan.json", "{not json"),
    ),
    C(
        "plan-huge",
        COMPRESS + "{w}/model.onnx -o {o}/m.onnx --plan {w}/bad.plan.json",
        sparse("bad.plan.json", 65 * 2**20),
    ),
    C(
        "plan-wrong-format",
        COMPRESS + "{w}/model.onnx -o {o}/m.onnx --plan {w}/bad.plan.json",
        plan_edit(lambda d: d.update(format="other/1")),
    ),
    C(
        "plan-rank-string",
        COMPRESS + "{w}/model.onnx -o {o}/m.onnx --plan {w}/bad.plan.json",
        plan_edit(lambda d: _first(d).update(rank="8")),
    ),
    C(
        "plan-shape-string",
        COMPRESS + "{w}/model.onnx -o {o}/m.onnx --plan {w}/bad.plan.json",
        plan_edit(lambda d: _first(d).update(shape="64x128")),
    ),
    C(
        "plan-weights-list",
        COMPRESS + "{w}/model.onnx -o {o}/m.onnx --plan {w}/bad.plan.json",
        plan_edit(lambda d: d.update(weights=[1, 2])),
    ),
    C(
        "plan-other-model",
        COMPRESS + "{w}/model.onnx -o {o}/m.onnx --plan {w}/bad.plan.json",
        plan_edit(_rename_first),
    ),
    C(
        "plan-wrong-shape",
        COMPRESS + "{w}/model.onnx -o {o}/m.onnx --plan {w}/bad.plan.json",
        plan_edit(_bigger_rank),
    ),
    C(
        "plan-negative-rank",
        COMPRESS + "{w}/model.onnx -o {o}/m.onnx --plan {w}/bad.plan.json",
        plan_edit(lambda d: _first(d).update(rank=-4)),
    ),
    # compress: options and statistics
    C("compress-ratio-high", COMPRESS + "{w}/model.onnx -o {o}/m.onnx --ratio 1.5"),
    C("compress-ratio-negative", COMPRESS + "{w}/model.onnx -o {o}/m.onnx --ratio -0.5"),
    C("compress-bad-include", COMPRESS + "{w}/model.onnx -o {o}/m.onnx --include ([a"),
    C("compress-bad-exclude", COMPRESS + "{w}/model.onnx -o {o}/m.onnx --exclude *x"),
    C(
        "compress-stats-pickle",
        "compress --method whiten {w}/model.onnx -o {o}/m.onnx --stats {w}/s.npz",
        evil_npz("s.npz"),
    ),
    C(
        "compress-stats-garbage",
        "compress --method whiten {w}/model.onnx -o {o}/m.onnx --stats {w}/data.txt",
    ),
    C(
        "compress-data-not-utf8",
        "compress --method whiten {w}/bert/model.onnx -o {o}/m.onnx --data {w}/bad.jsonl --tokenizer {w}/hf",
        write("bad.jsonl", NOT_UTF8),
    ),
    C(
        "compress-data-no-column",
        "compress --method whiten {w}/bert/model.onnx -o {o}/m.onnx --data {w}/data.jsonl --tokenizer {w}/hf --text-column nope",
    ),
    # build
    C("build-missing", "build {w}/nope.onnx -o {o}"),
    C("build-garbage", "build {w}/bad.onnx -o {o}", write("bad.onnx", b"\x00\x01garbage")),
    C("build-out-contains-input", "build {w}/model.onnx -o {w} --overwrite"),
    C(
        "build-out-foreign-folder",
        "build {w}/model.onnx -o {w}/foreign --overwrite",
        write("foreign/Makefile", "all:\n"),
    ),
    C("build-out-parent-file", "build {w}/model.onnx -o {w}/data.txt/eng"),
    C("build-out-is-file", "build {w}/model.onnx -o {w}/data.txt --overwrite"),
    C("build-out-not-empty", "build {w}/model.onnx -o {w}/full", write("full/x", "x")),
    C(
        "build-sidecar-symlink",
        "build {w}/sym/model.onnx -o {o}",
        copy("model.onnx", "sym/model.onnx"),
        link("sym/vocab.txt", "/etc/hostname"),
    ),
    C("build-dangling-input", "build {w}/bad.onnx -o {o}", model_edit(_dangling)),
    C("build-opset-99", "build {w}/bad.onnx -o {o}", model_edit(_opset99)),
    # export
    C("export-missing", "export {w}/nope -o {o}"),
    C("export-out-contains-model", "export {w}/hf -o {w} --overwrite"),
    C("export-out-is-model", "export {w}/hf -o {w}/hf --overwrite"),
    C("export-out-parent-file", "export {w}/hf -o {w}/data.txt/x"),
    C("export-config-not-utf8", "export {w}/hf -o {o}", write("hf/config.json", b'{"a": "\xff"}')),
    C("export-config-deep", "export {w}/hf -o {o}", write("hf/config.json", _deep())),
    C(
        "export-evil-bin",
        "export {w}/hf -o {o}",
        remove("hf/model.safetensors"),
        pickled("hf/pytorch_model.bin", torch_save=True),
    ),
    C("export-opset-99", "export {w}/hf -o {o} --opset 99"),
    # recover
    C(
        "recover-evil-checkpoint",
        RECOVER + "-o {o} --onnx {w}/bert/model.onnx --resume",
        marker_file("../out.checkpoints"),
        pickled("../out.checkpoints/checkpoint.pt", torch_save=True),
    ),
    C(
        "recover-evil-plain-pickle",
        RECOVER + "-o {o} --onnx {w}/bert/model.onnx --resume",
        marker_file("../out.checkpoints"),
        pickled("../out.checkpoints/checkpoint.pt"),
    ),
    C(
        "recover-truncated-checkpoint",
        RECOVER + "-o {o} --onnx {w}/bert/model.onnx --resume",
        marker_file("../out.checkpoints"),
        write("../out.checkpoints/checkpoint.pt", b"PK\x03\x04"),
    ),
    C(
        "recover-foreign-checkpoints",
        RECOVER + "-o {o} --onnx {w}/bert/model.onnx --resume",
        write("../out.checkpoints/notes.txt", "mine"),
    ),
    C("recover-max-samples-negative", RECOVER + "-o {o} --max-samples -3"),
    C(
        "recover-plan-not-utf8",
        "recover {w}/hf --plan {w}/p.json --data {w}/data.jsonl -o {o}",
        write("p.json", b"\xff\xfe"),
    ),
    C("recover-out-contains-model", RECOVER + "-o {w} --overwrite"),
    C(
        "recover-data-not-utf8",
        "recover {w}/hf --plan {w}/bert.plan.json --data {w}/bad.jsonl -o {o}",
        write("bad.jsonl", NOT_UTF8),
    ),
    C(
        "recover-plan-other-model",
        "recover {w}/hf --plan {w}/plan.json --data {w}/data.jsonl "
        "--onnx {w}/bert/model.onnx -o {o}",
    ),
    # bench
    C(
        "bench-baseline-in-output",
        BENCH + "-o {w}/rep --baseline {w}/rep/report.json",
        write("rep/report.json", '{"format": "x"}'),
    ),
    C("bench-out-is-file", BENCH + "-o {w}/data.txt"),
    C("bench-out-parent-file", BENCH + "-o {w}/data.txt/rep"),
    C("bench-out-is-input-folder", BENCH + "-o {w}"),
    C("bench-skip-rows-negative", BENCH + "-o {o} --data {w}/data.jsonl --skip-rows -1"),
    C("bench-max-samples-negative", BENCH + "-o {o} --data {w}/data.jsonl --max-samples -5"),
    C(
        "bench-goals-python-tag",
        BENCH + "-o {o} --goals {w}/g.yaml",
        lambda w, x: (w / "g.yaml").write_text(PY_TAG.format(x=x)),
    ),
    C("bench-goals-not-utf8", BENCH + "-o {o} --goals {w}/g.yaml", write("g.yaml", b"a: \xff\n")),
    C(
        "bench-manifest-escape",
        "bench -r {w}/eng -c {w}/model.onnx -o {o}",
        write("eng/manifest.json", '{"engine": "../../w/model.onnx"}'),
    ),
    C(
        "bench-manifest-not-utf8",
        "bench -r {w}/eng -c {w}/model.onnx -o {o}",
        write("eng/manifest.json", b'{"engine": "\xff"}'),
    ),
    C(
        "bench-manifest-deep",
        "bench -r {w}/eng -c {w}/model.onnx -o {o}",
        write("eng/manifest.json", _deep()),
    ),
    C("bench-baseline-deep", BENCH + "-o {o} --baseline {w}/b.json", write("b.json", _deep())),
    C("bench-missing-model", "bench -r {w}/nope.onnx -c {w}/model.onnx -o {o}"),
    C("bench-data-not-utf8", BENCH + "-o {o} --data {w}/bad.jsonl", write("bad.jsonl", NOT_UTF8)),
    # run
    C("run-missing-config", "run {w}/nope.yaml"),
    C(
        "run-python-tag",
        "run {w}/c.yaml",
        lambda w, x: (w / "c.yaml").write_text(PY_TAG.format(x=x)),
    ),
    C("run-not-utf8", "run {w}/c.yaml", write("c.yaml", b"model: \xff\n")),
    C("run-billion-laughs", "run {w}/c.yaml", write("c.yaml", LAUGHS)),
    C("run-recursive-alias", "run {w}/c.yaml", write("c.yaml", "model: &m [*m]\n")),
    C("run-deep", "run {w}/c.yaml", write("c.yaml", _deep(5000))),
    C("run-unknown-key", "run {w}/c.yaml", write("c.yaml", "modle: x\n")),
    C(
        "run-bad-regex",
        "run {w}/c.yaml",
        lambda w, x: (w / "c.yaml").write_text(RUN.format(w=w) + "compress:\n  include: '([a'\n"),
    ),
    C(
        "run-foreign-stage-folder",
        "run {w}/c.yaml",
        lambda w, x: (w / "c.yaml").write_text(RUN.format(w=w)),
        write("runout/build/Makefile", "all:\n"),
    ),
    C(
        "run-foreign-data-folder",
        "run {w}/c.yaml",
        lambda w, x: (w / "c.yaml").write_text(RUN.format(w=w)),
        write("runout/data/keep.txt", "mine"),
    ),
    C(
        "run-output-dir-is-file",
        "run {w}/c.yaml",
        lambda w, x: (w / "c.yaml").write_text(
            f"model: {w}/model.onnx\noutput_dir: {w}/data.txt\n"
        ),
    ),
    # assets
    C("assets-unknown-name", "assets no-such-asset --cache {o}"),
    C("assets-cache-is-file", "assets --cache {w}/data.txt"),
]


def test_corpus_is_large_and_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 60
    assert {c.argv.split()[0] for c in CASES} >= {
        "export",
        "compress",
        "build",
        "bench",
        "recover",
        "run",
        "assets",
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(
    case: Case, world: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from factorlm.cli import main

    root = world.parent
    marker = root / "PWNED"
    out = root / "out"
    if case.id.startswith("bench-manifest"):
        (world / "eng").mkdir(exist_ok=True)
    for step in case.setup:
        step(world, marker)
    monkeypatch.chdir(root)
    before = snapshot(root)
    argv = shlex.split(case.argv.format(w=world, o=out, x=marker))
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, err
    assert len(lines) == 1, err
    assert not marker.exists(), "a payload ran"
    after = snapshot(root)
    assert after == before, {k for k in before.keys() ^ after.keys()} or "a file changed"
