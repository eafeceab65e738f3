"""The README's commands are executed, so the docs cannot drift from the code.

The two set-up commands are checked against ``.ci/run`` (which runs them for real on a fresh
machine), and the quickstart block runs end to end on the real all-MiniLM-L6-v2 (slow).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from factorlm import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def _commands(block: str) -> list[str]:
    """Shell lines with continuations joined and trailing comments removed."""
    joined = block.replace("\\\n", " ")
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line]


def test_readme_starts_with_what_it_is_then_the_two_setup_commands() -> None:
    assert README.startswith("# factorlm\n\nfactorlm compresses pretrained transformer")
    setup, tests = _blocks()[:2]
    assert "pip install -c constraints-cpu.txt -e '.[cpu]'" in setup and "factorlm run" in setup
    assert "-e '.[cpu,dev]'" in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = _blocks()[1]
    for step in (
        "pip install -c constraints-cpu.txt -e '.[cpu,dev]'",
        "factorlm assets minilm reviews austen",
        "-m pytest -q",
    ):
        assert step in test_command and step in ci


def test_every_documented_subcommand_exists(capsys: pytest.CaptureFixture[str]) -> None:
    documented = set(re.findall(r"^\| `factorlm (\w+)", README, flags=re.M))
    assert documented >= {"assets", "export", "compress", "recover", "build", "bench", "run"}
    for name in sorted(documented):
        assert cli.main([name, "--help"]) == 0, name
    capsys.readouterr()


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    quickstart = next(b for b in _blocks() if "factorlm export" in b)
    env = dict(os.environ)
    factorlm_bin = str(Path(sys.executable).with_name("factorlm"))
    script = ["set -euo pipefail"]
    for line in _commands(quickstart):
        words = shlex.split(line, posix=True)
        if words[0] == "factorlm":
            line = line.replace("factorlm", shlex.quote(factorlm_bin), 1)
        if words[0] == "factorlm" and words[1] == "bench":
            line += " --iterations 5 --warmup 1 --shapes 1x128"  # keep the suite short
        script.append(line)
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1 = a goal failed, still a report
    assert (tmp_path / "report" / "report.json").is_file()
    assert (tmp_path / "engines" / "whiten" / "manifest.json").is_file()
