"""The CLI's contract: --version, -v/-q everywhere, exit statuses 0/1/2/3, no bare traceback.

A crash (any exception that is not a ``FactorlmError``) exits 3 with one line naming a log file
that holds the traceback; a user error exits 2 with one line; ``compress`` refuses to replace
an existing output without ``--overwrite`` and leaves it byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from pathlib import Path

import onnx
import pytest

from factorlm import cli
from factorlm.cli import _output
from models import mlp

VERBS = ("assets", "export", "compress", "recover", "build", "bench", "run", "sweep")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("FACTORLM_CACHE", str(root))
    return root


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(mlp(64, 192, 48), str(path))
    (path.parent / "config.json").write_text('{"model_type": "bert"}\n')
    (path.parent / "tokenizer.json").write_text("{}\n")
    return path


def test_version_names_factorlm_and_the_four_libraries(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["--version"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert names == ["factorlm", "onnxruntime", "onnx", "torch", "transformers"]
    assert lines[0] == f"factorlm {cli.version_lines()[0].split()[1]}"
    for line in lines:  # every installed one has a version number
        assert re.match(r"^\S+ (\d+\.\d+\S*|not installed)", line), line


def test_version_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys; from factorlm.cli import main; main(['--version']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("flag", ["-v", "--verbose", "-q", "--quiet", "-vv"])
def test_verbosity_flags_accepted_on_every_subcommand(
    verb: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([verb, flag, "--help"]) == 0
    assert cli.main([flag, verb, "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--verbose" in help_text and "--quiet" in help_text


def test_verbosity_sets_logging_and_contradictions_are_user_errors(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.onnx"
    base = ["compress", str(model), "-o", str(out), "--method", "svd", "--min-size", "0"]
    assert cli.main([*base, "-q"]) == 0
    assert capsys.readouterr().out == ""  # quiet: no table, no "wrote"
    assert _output.state.level == -1 and logging.getLogger().level == logging.ERROR
    assert cli.main(["-v", *base, "--overwrite"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert _output.state.level == 1 and logging.getLogger().level == logging.INFO
    assert cli.main([*base, "--overwrite", "-vv"]) == 0
    assert logging.getLogger().level == logging.DEBUG
    assert cli.main(["-q", *base, "--overwrite", "-v"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_unactionable_library_warnings_hidden_unless_verbose(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class TracerWarning(Warning):  # the name is what the hook matches (torch not imported)
        pass

    def record(name: str, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)

    base = ["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--method", "svd"]
    shown: dict[str, list[str]] = {}
    passed_on: list[str] = []
    for label, flags in (("default", []), ("verbose", ["-v"])):
        assert cli.main([*base, "--overwrite", *flags]) == 0
        capsys.readouterr()
        assert warnings.showwarning is _output._showwarning  # installed by main()
        seen: list[str] = []
        monkeypatch.setattr(_output, "_previous_showwarning", lambda m, *a: passed_on.append(m))
        for message, category in [
            ("trace might be incorrect", TracerWarning),
            ("`torch_dtype` is deprecated! Use `dtype` instead!", FutureWarning),
            ("a warning the user can act on", UserWarning),
        ]:
            passed_on.clear()
            _output._showwarning(message, category, "lib.py", 1)
            seen.append("".join(passed_on))
        for name, message in [
            ("transformers.configuration_utils", "`torch_dtype` is deprecated! Use `dtype`!"),
            ("optimum.exporters.onnx.base", "Weight deduplication check in the ONNX export "
             "requires accelerate. Please install accelerate to run it."),
            ("optimum.exporters.onnx.base", "an export problem the user can act on"),
        ]:  # fmt: skip
            seen.append(message if logging.getLogger(name).filter(record(name, message)) else "")
        shown[label] = seen
    assert [bool(s) for s in shown["default"]] == [False, False, True, False, False, True]
    assert all(shown["verbose"])


def test_internal_error_exits_3_with_one_line_and_a_log(
    monkeypatch: pytest.MonkeyPatch, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import factorlm.assets.prepare as prepare

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the cache index\nis inconsistent")

    monkeypatch.setattr(prepare, "prepare", boom)
    assert cli.main(["assets", "minilm"]) == 3
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out
    match = re.fullmatch(
        r"internal error: RuntimeError: the cache index is inconsistent; traceback in (\S+)",
        lines[0],
    )
    assert match is not None, lines[0]
    log = Path(match.group(1))
    assert log.parent == cache / "logs"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in boom" in text
    assert "RuntimeError: the cache index" in text and "factorlm assets minilm" in text


def test_user_errors_exit_2_with_one_line(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["no-such-verb"], "No such command"),
        (["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--method", "magic"], "'magic'"),
        (["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--ratio", "2"], "--ratio is 2"),
        (["compress", str(tmp_path / "nothing.onnx"), "-o", str(tmp_path / "o.onnx")], "neither"),
        (["build", str(model), "-o", str(tmp_path / "e"), "--backend", "onnx"], "'onnx'"),
    ]
    for argv, needle in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert needle in err, err
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "e").exists()


def test_missing_onnxruntime_is_a_user_error(
    monkeypatch: pytest.MonkeyPatch, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import factorlm.cli.compress as verb

    def no_ort(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")

    monkeypatch.setattr(verb, "_run_compress", no_ort)
    argv = ["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--method", "svd"]
    assert cli.main(argv) == 2
    assert "pip install 'factorlm[cpu]'" in capsys.readouterr().err


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_compress_refuses_existing_output_and_copies_sidecars(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out"
    argv = ["compress", str(model), "-o", str(out_dir), "--method", "svd", "--min-size", "0"]
    assert cli.main(argv) == 0
    names = {p.name for p in out_dir.iterdir()}
    assert names == {"model.onnx", "model.plan.json", "config.json", "tokenizer.json"}
    assert json.loads((out_dir / "config.json").read_text()) == {"model_type": "bert"}
    before = _digests(out_dir)
    capsys.readouterr()

    assert cli.main([*argv, "--ratio", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite" in err and len(err.strip().splitlines()) == 1
    assert _digests(out_dir) == before  # byte-identical, nothing added

    assert cli.main([*argv, "--ratio", "0.3", "--overwrite"]) == 0
    after = _digests(out_dir)
    assert after["model.onnx"] != before["model.onnx"]
    assert after["config.json"] == before["config.json"]

    # A file output refuses too, and the plan beside it counts as output.
    single = tmp_path / "single" / "c.onnx"
    base = ["compress", str(model), "-o", str(single), "--method", "svd", "--min-size", "0"]
    assert cli.main(base) == 0
    (single.parent / "c.onnx").unlink()
    assert cli.main(base) == 2  # c.plan.json is still there
    assert "c.plan.json already exists" in capsys.readouterr().err


def test_compress_refuses_a_sidecar_symlink_leaving_the_model_folder(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output\n")
    (model.parent / "vocab.txt").symlink_to(secret)
    out_dir = tmp_path / "out"
    argv = ["compress", str(model), "-o", str(out_dir), "--method", "svd", "--min-size", "0"]
    assert cli.main(argv) == 2
    assert "outside the model folder" in " ".join(capsys.readouterr().err.split())
    assert not (out_dir / "vocab.txt").exists()


def test_model_id_resolved_from_the_local_hf_cache_offline(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = tmp_path / "hub"
    snapshot = hub / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.onnx").write_bytes(model.read_bytes())
    (snapshot / "config.json").write_text('{"model_type": "bert"}\n')
    (hub / "models--acme--tiny" / "refs").mkdir()
    (hub / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    out = tmp_path / "out"
    argv = ["compress", "acme/tiny", "-o", str(out), "--method", "svd", "--min-size", "0"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert (out / "model.onnx").is_file() and (out / "config.json").is_file()
    assert cli.main(["compress", "acme/absent", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "acme/absent is neither a file or folder nor a model id in the local" in " ".join(
        err.split()
    )
