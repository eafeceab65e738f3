"""Helpers shared by the benchmark scripts: machine load, review feeds, timing and table cells.

The scripts import it as ``from _common import ...`` (the script's folder is on ``sys.path``
when it runs), the way ``data_aware.py`` imports ``allocation``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "add_timing_arguments",
    "alternate",
    "environment_lines",
    "fmt_interval",
    "machine",
    "nonzero_counts",
    "publish",
    "review_feeds",
    "review_texts",
    "rounds",
    "run_with_peak",
    "uptime",
]

K = TypeVar("K")


def uptime() -> str:
    """The ``uptime`` line (load averages), or a note when the command is missing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uptime unavailable"


def machine() -> str:
    """CPU, core count and ``uptime`` in one line (the machine is shared: record its load)."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, uptime: {uptime()}"
    )


def environment_lines(load_before: str, load_after: str, *, cpu_note: str = "") -> list[str]:
    """Markdown lines for the machine, the libraries and the load before and after a run.

    ``cpu_note`` is appended to the machine line (e.g. ``"; fp16 arithmetic on this CPU: no"``).
    """
    from factorlm.bench.latency import environment_info

    env = environment_info()
    return [
        f"Machine: {env['cpu']}, {env['cpu_count']} cores ({env['affinity']} usable), "
        f"{env['platform']}{cpu_note}.  ",
        f"Libraries: {', '.join(f'{k} {v}' for k, v in env['libraries'].items())}.  ",
        f"Load before: `{load_before}`  ",
        f"Load after: `{load_after}`  ",
    ]


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """``--iterations --warmup --threads --batches --seq`` of the alternating ORT timings."""
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads per session")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seq", type=int, default=128)


def rounds(iterations: int, batch: int) -> int:
    """Timing rounds at ``batch``: twice ``iterations`` at batch 1, whose runs are short."""
    return iterations if batch > 1 else iterations * 2


def alternate(
    runners: Mapping[K, Any],
    feeds: Mapping[str, np.ndarray],
    *,
    warmup: int,
    iterations: int,
    rng: np.random.Generator,
) -> dict[K, np.ndarray]:
    """Per-round seconds of every runner, all alternated in random order each round."""
    from factorlm.bench.latency import measure_alternating

    keys = list(runners)
    times = measure_alternating(
        [runners[k] for k in keys], feeds, warmup=warmup, iterations=iterations, rng=rng
    )
    return {k: times[:, i] for i, k in enumerate(keys)}


def review_texts() -> list[str]:
    """The text of every review in the reviews asset, in file order."""
    from factorlm.assets import reviews_path

    with open(reviews_path(), encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh.read().split("\n") if line.strip()]


def review_feeds(model_dir: Path, batch: int, seq: int, *, skip: int = 0) -> dict[str, np.ndarray]:
    """``batch`` review snippets from row ``skip`` on, tokenized and padded to ``seq`` tokens."""
    from transformers import AutoTokenizer

    texts = review_texts()[skip : skip + batch]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=seq, return_tensors="np"
    )
    return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}


def fmt_interval(iv: Any) -> str:
    """A speedup interval as ``1.23x [1.10, 1.35]``."""
    return f"{iv.estimate:.2f}x [{iv.low:.2f}, {iv.high:.2f}]"


def nonzero_counts(counts: Mapping[str, int]) -> str:
    """``"Attention 6, SkipLayerNormalization 12"``: the non-zero operator counts."""
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v)


def publish(out: Path, text: str) -> None:
    """Write ``text`` to ``out`` (creating its folder) and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


def run_with_peak(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    poll_s: float = 0.05,
) -> dict[str, Any]:
    """Run ``argv``; return its exit code, output, wall time and its *own* peak RSS in MiB.

    ``peak_mib`` is ``/usr/bin/time``'s maximum resident set size of the command: ``time`` is a
    small C program, so the forked image the command's high-water mark starts from is ~1 MiB,
    not the caller's (a Python parent's own ``ru_maxrss`` of a spawned child counts the parent's
    resident memory at the fork). ``polled_mib`` is the largest resident size of the command's
    process tree seen every ``poll_s`` seconds (psutil; None without it): a cross-check that
    can miss a short spike, never overcount. Without ``/usr/bin/time``, ``peak_mib`` is
    ``polled_mib``.
    """
    try:
        import psutil
    except ImportError:  # the polled figure is a cross-check only
        psutil = None
    timer = shutil.which("time", path="/usr/bin:/bin")
    with tempfile.TemporaryDirectory(prefix="factorlm-peak-") as tmp:
        report = Path(tmp) / "time.txt"
        full = [timer, "-f", "%M", "-o", str(report), *argv] if timer else list(argv)
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        polled = 0
        start = time.perf_counter()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(full, cwd=cwd, env=env, stdout=out, stderr=err)
            root = psutil.Process(proc.pid) if psutil is not None else None
            while proc.poll() is None:
                if root is not None:
                    try:
                        tree = [root, *root.children(recursive=True)]
                        polled = max(polled, sum(p.memory_info().rss for p in tree))
                    except psutil.Error:  # a process of the tree ended between the calls
                        pass
                time.sleep(poll_s)
        wall = time.perf_counter() - start
        lines = report.read_text().split() if timer and report.is_file() else []
        polled_mib = polled / 2**20 if root is not None else None
        peak_mib = int(lines[-1]) / 1024 if lines and lines[-1].isdigit() else polled_mib
        return {
            "returncode": proc.returncode,
            "stdout": out_path.read_text(errors="replace"),
            "stderr": err_path.read_text(errors="replace"),
            "wall_s": wall,
            "peak_mib": peak_mib,
            "polled_mib": polled_mib,
            "peak_source": "/usr/bin/time %M" if timer and lines else "psutil polling",
        }
