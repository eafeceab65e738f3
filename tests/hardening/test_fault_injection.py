"""Kill compress, build and run with SIGTERM and SIGKILL at seeded random moments.

The promise checked: after SIGTERM nothing partial remains (no hidden stage next to the output);
after SIGKILL the next run cleans the dead run's stage up and succeeds; the final output is at
every moment absent or complete and valid; inputs never change. Each command runs in a real
subprocess (signals need one), on a tiny model, so a kill lands inside real work.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from hardening.tree import snapshot

pytestmark = pytest.mark.slow

KILLS_PER_SIGNAL = 3
SEED = 19
_LAUNCH = "import sys; from factorlm.cli import main; sys.exit(main(sys.argv[1:]))"

RUN_CONFIG = """model: model.onnx
output_dir: out
data:
  path: data.jsonl
  label_column: null
  eval_samples: 10
  calibration_samples: 16
compress:
  method: svd
  ratio: 0.9
  min_size: 1
benchmark:
  task: none
  shapes: ["1x8"]
  iterations: 3
  warmup: 0
"""


def _cli(argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FACTORLM_CACHE": str(cwd / "cache")}
    return subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _valid_onnx(path: Path) -> bool:
    onnx.checker.check_model(str(path))
    return True


@dataclass(frozen=True)
class Command:
    name: str
    argv: list[str]
    output: str  # relative to the work folder
    stage_prefix: str  # hidden stage entries of this command start with it (in ``stage_dir``)
    stage_dir: str
    check: Callable[[Path], None]  # the final output, when present, is complete


def _check_compress(out: Path) -> None:
    if out.exists():
        assert _valid_onnx(out)


def _check_engine(out: Path) -> None:
    if out.exists():
        assert (out / "manifest.json").is_file() and _valid_onnx(out / "model.onnx")


def _check_run(out: Path) -> None:
    for stage in ("export", "data", "compress", "build", "benchmark"):
        folder = out / stage
        if folder.exists():
            assert (folder / ".factorlm-owned").is_file(), stage
    if (out / "compress").exists():
        assert _valid_onnx(out / "compress" / "model.onnx")
    if (out / "benchmark").exists():
        assert (out / "benchmark" / "report.json").is_file()


COMMANDS = [
    Command(
        "compress",
        ["compress", "model.onnx", "-o", "o/m.onnx", "--method", "svd", "--ratio", "0.9",
         "--min-size", "1", "--overwrite"],
        "o/m.onnx", ".m.onnx.", "o", _check_compress,
    ),
    Command(
        "build", ["build", "model.onnx", "-o", "eng", "--overwrite"], "eng", ".eng.", ".",
        _check_engine,
    ),
    Command("run", ["run", "c.yaml"], "out", ".tmp-", "out", _check_run),
]  # fmt: skip


def _stages(work: Path, cmd: Command) -> list[str]:
    folder = work / cmd.stage_dir
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(cmd.stage_prefix))


def _inputs_digest(work: Path) -> str:
    digest = hashlib.sha256()
    for name in ("model.onnx", "data.jsonl", "c.yaml"):
        digest.update((work / name).read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models import mlp

    root = tmp_path_factory.mktemp("faults")
    onnx.save(mlp(256, 512, 256, seed=3, decay=0.02), root / "model.onnx")
    (root / "data.jsonl").write_text(
        "".join(f'{{"text": "good movie number {i}"}}\n' for i in range(40))
    )
    (root / "c.yaml").write_text(RUN_CONFIG)
    return root


def _clean_duration(work: Path, cmd: Command) -> float:
    start = time.perf_counter()
    proc = _cli(cmd.argv, work)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    return time.perf_counter() - start


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.name for c in COMMANDS])
def test_killed_command_leaves_nothing_partial(work: Path, cmd: Command) -> None:
    before = _inputs_digest(work)
    duration = _clean_duration(work, cmd)
    rng = random.Random(f"{SEED}-{cmd.name}")
    for sig in [signal.SIGTERM] * KILLS_PER_SIGNAL + [signal.SIGKILL] * KILLS_PER_SIGNAL:
        delay = rng.uniform(0.4, 1.0) * duration
        proc = _cli(cmd.argv, work)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        cmd.check(work / cmd.output)  # never half-written
        if sig == signal.SIGTERM:
            assert proc.returncode in (0, 143, 130, -signal.SIGTERM), err.decode()
            assert _stages(work, cmd) == [], f"SIGTERM after {delay:.2f}s left a stage"
        else:
            again = _cli(cmd.argv, work)
            _, err = again.communicate(timeout=300)
            assert again.returncode == 0, err.decode()
            cmd.check(work / cmd.output)
            assert _stages(work, cmd) == [], f"the run after SIGKILL at {delay:.2f}s left a stage"
        assert _inputs_digest(work) == before
    assert "PWNED" not in snapshot(work)
