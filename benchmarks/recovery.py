"""Recovery by distillation on all-MiniLM-L6-v2 at 60 % of linear parameters, vs training-free.

Data (the shuffled reviews asset): rows [0, 256) calibrate the statistics of the data-aware
plans; rows [0, distill_rows) are the unlabelled distillation texts; the held-out rows start at
``heldout_start`` (fresh/rotten only, ``heldout`` of them), disjoint from both. On the held-out
rows the benchmark's probe (``factorlm.benchmark.tasks.classification_task``: logistic regression
trained on the *original's* embeddings of one half, every model evaluated on the other half)
gives accuracy, and the mean cosine of mean-pooled embeddings against the original gives
fidelity. Every model is run as ONNX by ONNX Runtime, the recovered one as exported.

Gap closed = (recovered − best training-free) / (original − best training-free).

    .venv/bin/python benchmarks/recovery.py [--steps 2000] [--time-budget 900] [--out benchmarks/results/recovery.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from allocation import evaluate  # same probe + pooled-cosine metrics as the other tables

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--time-budget", type=float, default=900.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--distill-rows", type=int, default=6000)
    parser.add_argument("--heldout-start", type=int, default=8000)
    parser.add_argument("--heldout", type=int, default=3000)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recovery.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from factorlm.assets import exported_minilm, minilm_dir, reviews_path
    from factorlm.calibration import collect_statistics
    from factorlm.compress import compress
    from factorlm.data import iter_records
    from factorlm.recovery import recover

    work = args.work or Path(tempfile.mkdtemp(prefix="factorlm-recovery-"))
    work.mkdir(parents=True, exist_ok=True)
    onnx_model, hf_dir = exported_minilm(), minilm_dir()
    rows = [r for r in iter_records(reviews_path()) if str(r.get("text", "")).strip()]
    distill = _write_jsonl(
        work / "distill.jsonl", [{"text": r["text"]} for r in rows[: args.distill_rows]]
    )
    held = [
        {"text": r["text"], "label": r["label"]}
        for r in rows[args.heldout_start :]
        if r["label"] in ("fresh", "rotten")
    ][: args.heldout]
    heldout = _write_jsonl(work / "heldout.jsonl", held)
    load_start = _load()
    stats = collect_statistics(onnx_model, distill, max_samples=256, progress=False)

    baselines: dict[str, Path] = {}
    for method in ("svd", "asvd", "whiten"):
        target = work / method / "model.onnx"
        compress(onnx_model, target, method=method, ratio=0.6, stats=stats)
        from factorlm.exporters.ort import copy_sidecars

        copy_sidecars(onnx_model, target.parent)
        baselines[method] = target
    start = time.perf_counter()
    result = recover(
        hf_dir, work / "whiten" / "model.plan.json", work / "recovered", method="distill",
        data=distill, steps=args.steps, time_budget_s=args.time_budget, seed=0,
        onnx_model=onnx_model, stats=stats, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
        threads=args.threads,
        checkpoint_every=250, overwrite=True, progress=sys.stderr.isatty(),
    )  # fmt: skip
    recover_wall = time.perf_counter() - start
    load_end = _load()
    models = {"original": onnx_model, **baselines, "whiten+distill": result.model}
    metrics = evaluate(models, heldout, onnx_model.parent, include_details=True)
    orig, rec = metrics["original"], metrics["whiten+distill"]
    best: dict[str, str] = {}
    closed: dict[str, float | None] = {}
    for key in ("accuracy", "pooled_cosine"):
        best[key] = max(baselines, key=lambda m, k=key: metrics[m][k])
        base = metrics[best[key]][key]
        closed[key] = (rec[key] - base) / (orig[key] - base) if orig[key] > base else None
    record = {
        "command": "python " + " ".join(["benchmarks/recovery.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_before": load_start,
        "load_after": load_end,
        "split": {"calibration": "rows 0-255", "distill": f"rows 0-{args.distill_rows - 1}",
                  "heldout": f"{len(held)} fresh/rotten rows from row {args.heldout_start}"},
        "recovery": {"steps": result.steps_done, "stopped": result.stopped,
                     "train_seconds": result.train_seconds, "wall_seconds": recover_wall,
                     "final_loss": result.final_loss, "lr": args.lr, "batch_size": args.batch_size,
                     "tagged_factors": result.tagged_factors, "export_rel_diff": result.max_relative_diff},
        "metrics": metrics,
        "best_training_free": best,
        "gap_closed": closed,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Recovery by distillation: all-MiniLM-L6-v2 at 60 % of linear parameters",
        "",
        f"Command: `{record['command']}` (after `factorlm assets`).",
        f"Machine: {record['machine']}, shared; load average before {load_start}, after {load_end}.",
        f"Split: calibration {record['split']['calibration']}, distillation {record['split']['distill']}, "
        f"held-out {record['split']['heldout']} (probe trained on the original's embeddings of half, "
        "evaluated on the other half).",
        f"Recovery: `distill` from the whiten plan, {result.steps_done} steps ({result.stopped}), "
        f"{result.train_seconds:.0f} s training, {recover_wall:.0f} s wall with export; "
        f"batch {args.batch_size}, lr {args.lr}.",
        "",
        "| model | probe accuracy % | pooled cosine vs original |",
        "|---|---|---|",
    ]
    for name in models:
        lines.append(
            f"| {name} | {metrics[name]['accuracy']:.2f} | {metrics[name]['pooled_cosine']:.4f} |"
        )
    lines += [
        "",
        "Gap closed = (recovered - best training-free) / (original - best training-free), per metric:",
        "",
        "| metric | best training-free | gap closed |",
        "|---|---|---|",
        *(
            f"| {k} | {best[k]} | {'-' if closed[k] is None else f'{closed[k]:.3f}'} |"
            for k in ("accuracy", "pooled_cosine")
        ),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
