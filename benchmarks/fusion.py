"""Does a factorized MiniLM stay fast after ONNX Runtime's optimizer and int8? (issue 10)

Compresses all-MiniLM-L6-v2 with whitened plans (calibration: the first 256 reviews) at each
ratio of linear parameters, with Q/K/V factorized jointly (``compress(joint_qkv=True)``), builds
"optimizer + int8" ORT engines of the original and of every compressed model (the build
collapses factor pairs for the optimizer and restores them, see
``factorlm.exporters.fusions``), and reports side by side:

* fused / quantized operator counts of every engine, and the fusions lost against the original;
* latency at batch 1 and 8, sequence 128, all engines alternated in random order each round
  after warm-up; speedups are medians of per-round paired ratios with bootstrap intervals;
* accuracy of a logistic-regression probe on mean-pooled embeddings, fresh vs rotten, on
  held-out reviews (rows after the calibration ones), probe trained on the original fp32
  model's embeddings and applied to every engine.

Usage: ``.venv/bin/python benchmarks/fusion.py [--ratios 0.6,0.5] [--iterations 30]
[--threads 1] [--eval-rows 600] [--work DIR] [--out benchmarks/results/fusion.md]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    add_timing_arguments,
    alternate,
    environment_lines,
    fmt_interval,
    nonzero_counts,
    publish,
    review_feeds,
    review_texts,
    rounds,
    uptime,
)

__all__ = ["main"]

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
CALIBRATION_ROWS = 256


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="0.6,0.5")
    parser.add_argument("--rank-multiple", type=int, default=16)
    add_timing_arguments(parser)
    parser.add_argument("--eval-rows", type=int, default=600)
    parser.add_argument("--work", type=Path, default=Path("/tmp/factorlm-bench-fusion"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fusion.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from factorlm._common.text import TextTokenizer, find_tokenizer
    from factorlm.assets import exported_minilm, reviews_path
    from factorlm.bench.latency import latency_summary, speedup_interval
    from factorlm.bench.runners import OrtRunner
    from factorlm.bench.tasks import classification_task, load_dataset
    from factorlm.calibration import collect_statistics
    from factorlm.compression import compress
    from factorlm.exporters.fusions import lost_fusions
    from factorlm.exporters.ort import build_ort_engine

    command = " ".join([".venv/bin/python", "benchmarks/fusion.py", *sys.argv[1:]])
    load_before = uptime()
    original = exported_minilm()
    args.work.mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",")]

    start = time.perf_counter()
    stats = collect_statistics(
        original,
        review_texts()[:CALIBRATION_ROWS],
        tokenizer=original.parent,
        max_samples=CALIBRATION_ROWS,
        progress=False,
    )
    calib_s = time.perf_counter() - start

    models: dict[str, Path] = {"original": original}
    results: dict[str, Any] = {}
    for ratio in ratios:
        name = f"whiten {ratio:.0%}"
        out = args.work / f"whiten-{ratio}" / "model.onnx"
        start = time.perf_counter()
        results[name] = compress(
            original,
            out,
            method="whiten",
            ratio=ratio,
            stats=stats,
            joint_qkv=True,
            rank_multiple=args.rank_multiple,
        )
        results[name].seconds["total"] = time.perf_counter() - start
        for sidecar in (
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "special_tokens_map.json",
        ):
            if (original.parent / sidecar).is_file():
                (out.parent / sidecar).write_bytes((original.parent / sidecar).read_bytes())
        models[name] = out
        logger.warning("compressed %s in %.0f s", name, results[name].seconds["total"])

    manifests = {}
    for name, path in models.items():
        start = time.perf_counter()
        manifests[name] = build_ort_engine(
            path,
            args.work / "engines" / name.replace(" ", "-").replace("%", ""),
            int8=True,
            overwrite=True,
            reference=original if name != "original" else None,
        )
        logger.warning("built %s in %.1f s", name, time.perf_counter() - start)

    runners = {
        name: OrtRunner(m.engine_path, name=name, intra_op_threads=args.threads, inter_op_threads=1)
        for name, m in manifests.items()
    }
    reference_fp32 = OrtRunner(
        original, name="original fp32", intra_op_threads=args.threads, inter_op_threads=1
    )
    keys = list(runners)
    rng = np.random.default_rng(0)
    for runner in [reference_fp32, *runners.values()]:
        runner.__enter__()
    try:
        dataset = load_dataset(
            reviews_path(),
            labels=["fresh", "rotten"],
            skip_rows=CALIBRATION_ROWS,
            limit=args.eval_rows,
        )
        tokenizer = TextTokenizer(find_tokenizer(original.parent))
        start = time.perf_counter()
        probe = classification_task([reference_fp32, *runners.values()], tokenizer, dataset)
        probe_s = time.perf_counter() - start
        per_batch: dict[int, dict[str, Any]] = {}
        for batch in (int(b) for b in args.batches.split(",")):
            feeds = review_feeds(original.parent, batch, args.seq, skip=CALIBRATION_ROWS)
            iterations = rounds(args.iterations, batch)
            col = alternate(runners, feeds, warmup=args.warmup, iterations=iterations, rng=rng)
            per_batch[batch] = {
                "iterations": iterations,
                "p50": {k: latency_summary(col[k], batch)["p50_ms"] for k in keys},
                "speedup": {k: speedup_interval(col["original"], col[k], rng=rng) for k in keys},
            }
            logger.warning("batch %s done (%s rounds)", batch, iterations)
    finally:
        for runner in [reference_fp32, *runners.values()]:
            runner.__exit__(None, None, None)
    load_after = uptime()

    scores = {"original fp32": float(probe["reference"]), **probe["candidates"]}
    lines = [
        "# Fusion-preserving factorization: compressed + optimizer + int8 vs original + optimizer + int8",
        "",
        f"Command: `{command}`  ",
        f"Model: all-MiniLM-L6-v2 (`factorlm.assets.exported_minilm()`); calibration: first "
        f"{CALIBRATION_ROWS} reviews ({stats.tokens:,} tokens, {calib_s:.0f} s); plans: whitened, "
        f"Q/K/V factorized jointly (`compress(method='whiten', ratio=R, joint_qkv=True, "
        f"rank_multiple={args.rank_multiple})`).  ",
        "Engines: `build_ort_engine(model, int8=True)` (transformer optimizer, then dynamic int8 "
        "with uint8 per-channel weights).  ",
        *environment_lines(load_before, load_after),
        f"Timing: {len(keys)} engines alternated in random order every round, {args.warmup} warm-up "
        f"rounds, intra-op threads {args.threads}, sequence {args.seq}, held-out review snippets "
        "padded to the sequence length. Speedups are medians of per-round paired ratios against "
        "the original engine with 95% bootstrap intervals; >1 means faster.",
        "",
        "## Models and fusions",
        "",
        "| model | linear params kept | ranks (joint QKV / other) | fused + quantized ops (int8 engine) "
        "| fusions after the optimizer | lost vs original | factor weights int8 |",
        "|---|---:|---|---|---|---|---|",
    ]
    for name, manifest in manifests.items():
        engine_ops = nonzero_counts(manifest.fusions["engine"])
        optimized = nonzero_counts(manifest.fusions.get("optimized", {}))
        q = manifest.quantization or {}
        quant = f"{q.get('factor_quantized', 0)}/{q.get('factor_weights', 0)}"
        if name == "original":
            lines.append(f"| original | 100% | - | {engine_ops} | {optimized} | - | {quant} |")
            continue
        res = results[name]
        kept = res.params_after / res.params_before
        joint = sorted({w.rank for k, w in res.plan.weights.items() if "+" in k})
        other = sorted({w.rank for k, w in res.plan.weights.items() if "+" not in k})
        lost = lost_fusions(
            manifests["original"].fusions["optimized"], manifest.fusions["optimized"]
        )
        lines.append(
            f"| {name} | {kept:.1%} ({res.factorized} weights, {len(res.plan.skipped)} dense) "
            f"| {joint} / {other} | {engine_ops} | {optimized} | {lost or 'none'} | {quant} |"
        )
    lines += ["", "## Latency and probe accuracy", ""]
    header = "| engine | probe accuracy % |"
    rule = "|---|---:|"
    for batch, data in per_batch.items():
        header += f" batch {batch} p50 ms | batch {batch} speedup vs original ({data['iterations']} rounds) |"
        rule += "---:|---:|"
    lines += [header, rule]
    lines.append(
        f"| original fp32 (probe reference, no optimizer) | {scores['original fp32']:.1f} |"
        + " | |" * len(per_batch)
    )
    for key in keys:
        row = f"| {key} + optimizer + int8 | {scores.get(key, float('nan')):.1f} |"
        for data in per_batch.values():
            row += f" {data['p50'][key]:.1f} | {fmt_interval(data['speedup'][key])} |"
        lines.append(row)
    lines += [
        "",
        f"Probe: {probe.get('details', {}).get('method', 'logistic regression')}, "
        f"{args.eval_rows} held-out fresh/rotten reviews (rows after the first {CALIBRATION_ROWS}), "
        f"{probe_s:.0f} s.  ",
        "",
    ]
    publish(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
