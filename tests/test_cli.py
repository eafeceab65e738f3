"""The CLI's contract: user errors become one line and exit status 2."""

from __future__ import annotations

import pytest
import typer

from factorlm import cli
from factorlm.errors import ModelLoadError


def test_factorlm_error_becomes_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    probe = typer.Typer()

    @probe.command()
    def boom() -> None:
        raise ModelLoadError(
            "model.onnx is not an ONNX file; try `pip install factorlm[tensorrt]`."
        )

    @probe.command()
    def other() -> None:
        """A second command, so that Typer expects a subcommand name."""

    monkeypatch.setattr(cli, "app", probe)
    assert cli.main(["boom"]) == 2
    err = capsys.readouterr().err
    assert "model.onnx is not an ONNX file; try `pip install factorlm[tensorrt]`." in err
    assert "Traceback" not in err


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["no-such-command"]) == 2
    assert "Traceback" not in capsys.readouterr().err
