"""Calibration throughput and peak memory on the real all-MiniLM-L6-v2 for 64, 256, 1024 samples.

Why each size runs in a fresh process: peak RSS (``ru_maxrss``) is a per-process high-water mark,
so it shows whether memory grows with the number of samples (it must stay flat: statistics are
reduced batch by batch). The cache is a temporary folder, so nothing is read back from disk.

    .venv/bin/python benchmarks/calibration.py [--sizes 64 256 1024] [--out benchmarks/results/calibration.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main", "measure"]

logger = logging.getLogger(__name__)


def measure(samples: int, batch_size: int, max_length: int) -> dict[str, float]:
    """One calibration run in this process: tokens, seconds, tokens/s, peak RSS (MiB)."""
    from factorlm.assets import exported_minilm, reviews_path
    from factorlm.calibration import collect_statistics

    model = exported_minilm()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        stats = collect_statistics(
            model,
            reviews_path(),
            max_samples=samples,
            batch_size=batch_size,
            max_length=max_length,
            cache_dir=Path(cache),
            progress=False,
        )
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "samples": samples,
        "tokens": stats.tokens,
        "weights": len(stats.gram),
        "seconds": seconds,
        "tokens_per_s": stats.tokens / seconds,
        "rss_before_mib": before,
        "peak_rss_mib": peak,
    }


def _machine() -> str:
    import numpy
    import onnxruntime

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, load average {load} at start; "
        f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
        f"numpy {numpy.__version__}, {platform.system()} {platform.release()}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run every size in its own process and write a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration.md"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child, args.batch_size, args.max_length)))
        return 0
    machine = _machine()
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(size), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(row, flush=True)
        rows.append(row)
    lines = [
        "# Calibration throughput and memory (all-MiniLM-L6-v2, real reviews)",
        "",
        f"Command: `.venv/bin/python benchmarks/calibration.py --sizes {' '.join(map(str, args.sizes))}`"
        f" (batch {args.batch_size}, max_length {args.max_length}; each size in a fresh process, "
        "cold statistics cache).",
        "",
        f"Machine: {machine}.",
        "",
        "| samples | tokens | weights | seconds | tokens/s | RSS before (MiB) | peak RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['samples']} | {r['tokens']} | {r['weights']} | {r['seconds']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['rss_before_mib']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    growth = rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]
    lines += [
        "",
        f"Peak memory from {rows[0]['samples']} to {rows[-1]['samples']} samples changes by "
        f"{growth:+.0f} MiB while the token count grows "
        f"{rows[-1]['tokens'] / rows[0]['tokens']:.1f}x: statistics are reduced batch by batch "
        "(float64 Gram per weight), so memory is flat in the number of samples.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
