"""Peak resident memory of each stage of ``factorlm run``, from the run's own manifest.

Runs ``factorlm run [CONFIG] -o OUT --force`` (default: the embedded all-MiniLM-L6-v2 job) in a
fresh process, then reads ``OUT/manifest.json``, where every stage records its memory
(``pipeline.memory.StagePeak``: resident MiB at the stage's start, its own peak, what is left
after the stage released what it loaded, and the process's peak so far). Writes a table with the
fp32 model size for scale (the issue's target: the whole run within 3x the fp32 model plus a
fixed overhead).

The benchmark stage measures latency: do not run this while someone else measures speed on the
same machine.

    .venv/bin/python benchmarks/run_memory.py [--config CONFIG.yaml] [--work DIR]
        [--out benchmarks/results/run_memory.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, publish

__all__ = ["main", "stage_rows"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def stage_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage that ran: name, seconds and its memory record (MiB)."""
    rows = []
    for name, entry in manifest.get("stages", {}).items():
        memory = entry.get("info", {}).get("memory")
        if memory:
            rows.append({"stage": name, "seconds": entry.get("seconds"), **memory})
    return rows


def _model_mib(out: Path) -> float | None:
    """fp32 bytes of the exported reference model's initializers."""
    exported = out / "export" / "model.onnx"
    if not exported.is_file():
        return None
    import numpy as np
    import onnx

    model = onnx.load(str(exported), load_external_data=False)
    elements = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return 4 * elements / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "run_memory.md")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="factorlm-run-memory-"))
    out = work / "run"
    command = [str(Path(sys.executable).with_name("factorlm")), "run"]
    if args.config is not None:
        command.append(str(args.config))
    command += ["-o", str(out), "--force"]
    before = machine()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: a goal failed, the stages still ran
        raise SystemExit(f"factorlm run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    rows = stage_rows(manifest)
    model_mib = _model_mib(out)
    peak = max((r["peak_rss_mib"] or 0.0 for r in rows), default=0.0)
    scale = f"{model_mib:.1f} MiB" if model_mib else "unknown"
    lines = [
        "# factorlm run: peak resident memory per stage",
        "",
        f"Command: `{' '.join(['factorlm', *command[1:]])}` (from "
        f"`python benchmarks/run_memory.py {' '.join(argv or sys.argv[1:])}`)  ",
        f"Machine (before): {before}  ",
        f"Machine (after): {machine()}  ",
        f"Exit status {done.returncode}, wall {wall:.0f} s; reference model fp32 weights: {scale}.  ",
        f"Whole run's peak: {peak:.0f} MiB"
        + (f" = {peak / model_mib:.1f}x the fp32 model." if model_mib else "."),
        "",
        "| stage | seconds | RSS at start | stage peak | RSS after release | process peak so far |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['seconds']:.1f} | {r['start_rss_mib']:.0f} MiB | "
            f"{r['peak_rss_mib']:.0f} MiB | {r['end_rss_mib']:.0f} MiB | "
            f"{r['process_peak_rss_mib']:.0f} MiB |"
        )
    if rows:
        lines += ["", f"Method: {rows[0]['method']}."]
    publish(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
