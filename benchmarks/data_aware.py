"""Data-aware methods at one parameter budget on the real all-MiniLM-L6-v2: svd, whiten, asvd, fwsvd.

Every method factorizes the same 36 linear weights at ``--ratio`` (default 0.6) of their
parameters, allocated by the exact optimum of the summed relative and of the summed absolute
errors of each method's own, data-aware spectrum. Statistics: activation Gram / mean |x| from reviews rows
[0, 256) (``collect_statistics``); Fisher row sums (FWSVD) from the PyTorch model of the same HF
folder on the first ``--fisher-samples`` labelled fresh/rotten reviews (a fixed logistic probe on
the frozen encoder, see ``factorlm.calibration.fisher``). Held-out: ``--heldout`` fresh/rotten rows
from row ``--heldout-start`` on, disjoint from both. Metrics as in ``benchmarks/allocation.py``.

    .venv/bin/python benchmarks/data_aware.py [--ratio 0.6]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

from _common import machine
from allocation import (
    VARIANTS,
    add_heldout_arguments,
    compress_variant,
    evaluate,
    prepare,
    write_results,
)

__all__ = ["main"]

logger = logging.getLogger(__name__)

METHODS = ("svd", "whiten", "asvd", "fwsvd")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--variants", nargs="+", default=["optimal-rel-floor50"])
    parser.add_argument("--fisher-samples", type=int, default=128)
    add_heldout_arguments(parser, "data_aware.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from factorlm.assets import minilm_dir, reviews_path
    from factorlm.calibration import collect_fisher, collect_statistics

    work, source, heldout = prepare(args, "factorlm-data-aware-")
    before = machine()
    start = time.perf_counter()
    stats: Any = collect_statistics(source, reviews_path(), max_samples=256, progress=False)
    if "fwsvd" in args.methods:
        fisher = collect_fisher(
            minilm_dir(),
            source,
            reviews_path(),
            task="classification",
            labels=("fresh", "rotten"),
            max_samples=args.fisher_samples,
            progress=False,
        )
        stats = dataclasses.replace(stats, fisher=fisher)
    stats_seconds = time.perf_counter() - start
    models: dict[str, Path] = {"original": source}
    budget: dict[str, dict[str, Any]] = {}
    for method in args.methods:
        for variant in args.variants:
            key = f"{method}/{variant}"
            target = work / method / variant / "model.onnx"
            budget[key] = compress_variant(
                source, target, method=method, ratio=args.ratio, stats=stats, **VARIANTS[variant]
            )
            models[key] = target
    metrics = evaluate(models, heldout, source.parent)
    seconds = time.perf_counter() - start
    rows = [
        {"method": k.split("/")[0], "variant": k.split("/")[1], **budget[k], **metrics[k]}
        for k in budget
    ]
    record = {
        "command": "python " + " ".join(["benchmarks/data_aware.py", *(argv or sys.argv[1:])]),
        "machine_before": before,
        "machine_after": machine(),
        "seconds": seconds,
        "statistics_seconds": stats_seconds,
        "ratio": args.ratio,
        "heldout": f"{args.heldout} fresh/rotten rows from row {args.heldout_start}",
        "original": metrics["original"],
        "rows": rows,
    }
    lines = [
        f"# Data-aware methods on all-MiniLM-L6-v2 at {args.ratio} of linear parameters",
        "",
        f"Command: `{record['command']}` (after `factorlm assets`); {seconds:.0f} s "
        f"(statistics {stats_seconds:.0f} s, cached after the first run).",
        f"Machine before: {before}",
        f"Machine after: {record['machine_after']}",
        f"Calibration: Gram / mean |x| from reviews rows 0-255; Fisher from the first "
        f"{args.fisher_samples} labelled fresh/rotten reviews; held-out: {record['heldout']}.",
        "Allocation (benchmarks/allocation.py VARIANTS): "
        + "; ".join(f"{v} = {VARIANTS[v]}" for v in args.variants)
        + ". Each method allocates over its own (data-aware) spectrum.",
        "",
        "| method | allocation | achieved ratio | factorized / dense | ranks | pooled cosine | probe acc % |",
        "|---|---|---|---|---|---|---|",
        f"| original | - | 1.000 | - | - | 1.0000 | {metrics['original']['accuracy']:.1f} |",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['variant']} | {row['achieved_ratio']:.3f} | {row['factorized']} / {row['dense']} "
            f"| {row['ranks']} | {row['pooled_cosine']:.4f} | {row['accuracy']:.1f} |"
        )
    write_results(args.out, record, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
