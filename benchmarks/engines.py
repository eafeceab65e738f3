"""What does factorization add on top of ONNX Runtime's own optimizations and int8?

Builds ORT engines of the original and the compressed all-MiniLM-L6-v2 under each option
(unoptimized, transformer-optimized, fp16 where the CPU has fp16 arithmetic, int8 dynamic
quantization), then times *all* engines in one alternating loop (random order every round, after
warm-up) at batch 1 and 8, sequence 128, on real review snippets. Every ratio is paired:

* compressed vs original under the same option: the fair speedup of factorization;
* each engine vs the unoptimized original: what ORT optimization / int8 alone give, and what
  factorization adds to them.

The CPU is shared, so the result file records the machine, ``uptime`` before and after, and
bootstrap intervals on the paired ratios.

Usage: ``.venv/bin/python benchmarks/engines.py [--ratio 0.5] [--method svd] [--iterations 30]
[--threads 1] [--work DIR] [--out benchmarks/results/engines.md]``.
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
    rounds,
    uptime,
)

__all__ = ["OPTIONS", "cpu_has_fp16", "main"]

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent

#: Engine options: name -> build_ort_engine keyword arguments.
OPTIONS: dict[str, dict[str, Any]] = {
    "unoptimized": {"optimize": False},
    "optimized": {},
    "fp16": {"fp16": True},
    "int8": {"int8": True},
}


def cpu_has_fp16() -> bool:
    """True when the CPU computes in fp16 natively (x86 AVX512-FP16/AMX-FP16, ARM fphp/asimdhp).

    Without it, ORT's CPU kernels upcast fp16 to fp32 around every op: the timing would measure
    the casts, not fp16.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(text.split())
    return bool(flags & {"avx512fp16", "amx_fp16", "fphp", "asimdhp"})


def pooled_cosine(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean cosine of mean-pooled token embeddings (how the model is used)."""
    m = mask[..., None].astype(np.float64)
    x = (a * m).sum(1) / m.sum(1)
    y = (b * m).sum(1) / m.sum(1)
    return float(((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))).mean())


def build_all(
    models: dict[str, Path], options: list[str], work: Path
) -> dict[tuple[str, str], Any]:
    """Build one engine per (model, option); returns the manifests."""
    from factorlm.exporters.ort import build_ort_engine

    manifests = {}
    for model_name, path in models.items():
        for option in options:
            out = work / "engines" / f"{model_name}-{option}"
            start = time.perf_counter()
            manifests[(model_name, option)] = build_ort_engine(
                path, out, overwrite=True, **OPTIONS[option]
            )
            logger.warning("built %s/%s in %.1f s", model_name, option, time.perf_counter() - start)
    return manifests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="svd")
    parser.add_argument("--ratio", type=float, default=0.5)
    add_timing_arguments(parser)
    parser.add_argument("--work", type=Path, default=Path("/tmp/factorlm-bench-engines"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "engines.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from factorlm.assets import exported_minilm
    from factorlm.bench.latency import latency_summary, speedup_interval
    from factorlm.bench.runners import OrtRunner
    from factorlm.compression import compress
    from factorlm.exporters.fusions import lost_fusions

    command = " ".join([".venv/bin/python", "benchmarks/engines.py", *sys.argv[1:]])
    load_before = uptime()
    original = exported_minilm()
    args.work.mkdir(parents=True, exist_ok=True)
    compressed = args.work / "compressed" / "model.onnx"
    start = time.perf_counter()
    result = compress(original, compressed, method=args.method, ratio=args.ratio, joint_qkv=False)
    compress_s = time.perf_counter() - start
    models = {"original": original, "compressed": compressed}
    options = [o for o in OPTIONS if o != "fp16" or cpu_has_fp16()]
    manifests = build_all(models, options, args.work)

    runners: dict[tuple[str, str], OrtRunner] = {}
    for key, manifest in manifests.items():
        level = (
            "disable"
            if manifest.session["graph_optimization_level"] == "ORT_DISABLE_ALL"
            else "all"
        )
        runners[key] = OrtRunner(
            manifest.engine_path,
            name="/".join(key),
            intra_op_threads=args.threads,
            inter_op_threads=1,
            graph_optimization_level=level,
        )
    keys = list(runners)
    rng = np.random.default_rng(0)
    per_batch: dict[int, dict[str, Any]] = {}
    for runner in runners.values():
        runner.__enter__()
    try:
        for batch in (int(b) for b in args.batches.split(",")):
            feeds = review_feeds(original.parent, batch, args.seq)
            outputs = {k: r.infer(feeds) for k, r in runners.items()}
            name = next(iter(outputs[keys[0]]))
            ref = {m: outputs[(m, "unoptimized")][name] for m in models}
            fidelity = {
                k: pooled_cosine(out[name], ref[k[0]], feeds["attention_mask"])
                for k, out in outputs.items()
            }
            iterations = rounds(args.iterations, batch)
            col = alternate(runners, feeds, warmup=args.warmup, iterations=iterations, rng=rng)
            base = col[("original", "unoptimized")]
            rows = []
            for option in options:
                o, c = col[("original", option)], col[("compressed", option)]
                rows.append(
                    {
                        "option": option,
                        "original_p50_ms": latency_summary(o, batch)["p50_ms"],
                        "compressed_p50_ms": latency_summary(c, batch)["p50_ms"],
                        "factorization": speedup_interval(o, c, rng=rng),
                        "original_vs_unopt": speedup_interval(base, o, rng=rng),
                        "compressed_vs_unopt": speedup_interval(base, c, rng=rng),
                        "cos_original": fidelity[("original", option)],
                        "cos_compressed": fidelity[("compressed", option)],
                    }
                )
            per_batch[batch] = {
                "rows": rows,
                "iterations": iterations,
                "compressed_vs_original_cos": pooled_cosine(
                    ref["compressed"], ref["original"], feeds["attention_mask"]
                ),
            }
            logger.warning("batch %s done (%s rounds)", batch, iterations)
    finally:
        for runner in runners.values():
            runner.__exit__(None, None, None)
    load_after = uptime()

    fp16_note = "yes" if cpu_has_fp16() else "no (fp16 rows skipped)"
    lines = [
        "# ORT engines: original vs compressed all-MiniLM-L6-v2",
        "",
        f"Command: `{command}`  ",
        f"Compression: `compress(method={args.method!r}, ratio={args.ratio})` in {compress_s:.0f} s: "
        f"{result.factorized} weights factorized, targeted parameters "
        f"{result.params_before:,} -> {result.params_after:,}, model parameters "
        f"{result.model_params_before:,} -> {result.model_params_after:,}.  ",
        *environment_lines(
            load_before, load_after, cpu_note=f"; fp16 arithmetic on this CPU: {fp16_note}"
        ),
        f"Timing: all {len(keys)} engines alternated in random order each round, {args.warmup} "
        f"warm-up rounds, intra-op threads {args.threads}, sequence {args.seq}, real review "
        "snippets padded to the sequence length. Ratios are medians of per-round paired ratios "
        "with 95% bootstrap intervals; >1 means faster.",
        "",
    ]
    for batch, data in per_batch.items():
        lines += [
            f"## Batch {batch} ({data['iterations']} rounds)",
            "",
            "| option | original p50 ms | compressed p50 ms | compressed vs original (same option) "
            "| original vs unoptimized original | compressed vs unoptimized original "
            "| cos(original engine, original) | cos(compressed engine, compressed) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in data["rows"]:
            lines.append(
                f"| {row['option']} | {row['original_p50_ms']:.1f} | {row['compressed_p50_ms']:.1f} "
                f"| {fmt_interval(row['factorization'])} | {fmt_interval(row['original_vs_unopt'])} "
                f"| {fmt_interval(row['compressed_vs_unopt'])} | {row['cos_original']:.5f} "
                f"| {row['cos_compressed']:.5f} |"
            )
        by = {row["option"]: row for row in data["rows"]}
        summary = [
            f"ORT transformer optimization alone {by['optimized']['original_vs_unopt'].estimate:.2f}x",
            f"int8 alone {by['int8']['original_vs_unopt'].estimate:.2f}x",
            f"factorization on top of the optimized engine {by['optimized']['factorization'].estimate:.2f}x",
            f"on top of int8 {by['int8']['factorization'].estimate:.2f}x",
            f"int8 + factorization together {by['int8']['compressed_vs_unopt'].estimate:.2f}x",
        ]
        lines += [
            "",
            f"Summary (vs the unoptimized original unless stated): {'; '.join(summary)}.  ",
            f"Compressed vs original model (fp32, pooled cosine): {data['compressed_vs_original_cos']:.4f}.",
            "",
        ]
    lines += [
        "## Engines",
        "",
        "| engine | MB | fused / quantized ops | int8 weights (factors) |",
        "|---|---:|---|---|",
    ]
    for key, manifest in manifests.items():
        fused = nonzero_counts(manifest.fusions["engine"])
        q = manifest.quantization
        quant = (
            f"{q['quantized']}/{q['weights']} ({q['factor_quantized']}/{q['factor_weights']})"
            if q
            else ""
        )
        lines.append(
            f"| {'/'.join(key)} | {manifest.sizes['engine_bytes'] / 1e6:.1f} | {fused} | {quant} |"
        )
    lost = lost_fusions(
        manifests[("original", "optimized")].fusions["engine"],
        manifests[("compressed", "optimized")].fusions["engine"],
    )
    lines += [
        "",
        f"Fusions the compressed model loses under the transformer optimizer: {lost or 'none'}.",
        "",
    ]
    publish(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
