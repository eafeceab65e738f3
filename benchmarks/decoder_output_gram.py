"""Issue 16: loss-aware whitening with the FULL output-gradient Gram on SmolLM2-135M (one check).

``compress(method="whiten", loss_aware=True)`` with ``stats.output_gram`` (``H = Σ_t g_t g_tᵀ``
per weight, ``collect_output_gram(task="lm")``) instead of its diagonal (``output_fisher``), on
the split of ``benchmarks/decoder_quality.py``: Gram and output Gram from the first 32 chunks of
256 tokens of *Emma*, perplexity (8 windows of 512 tokens, ORT) on *Pride and Prejudice* (test)
and *Persuasion* (tune). Compare with decoder_quality.md's ``emma / loss_aware`` rows (the
diagonal, same statistics otherwise); ``--diagonal`` recomputes that row here as well.

Memory: the 210 output Grams of SmolLM2 are ``8·out²`` bytes each (19 MB for the 1536-wide
gate/up outputs); their total and the process's peak RSS are recorded.

Usage: ``OPENBLAS_NUM_THREADS=1 python benchmarks/decoder_output_gram.py [--ratios 0.8]
[--diagonal] [--work DIR]``; writes ``benchmarks/results/decoder_output_gram.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import environment_lines, uptime  # noqa: E402
from decoder_quality import CHUNK_TOKENS, CHUNKS, _emma_chunks, _ids, _perplexity, say  # noqa: E402

__all__ = ["main"]

RESULTS = HERE / "results" / "decoder_output_gram"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8])
    parser.add_argument("--diagonal", action="store_true", help="also the diagonal loss_aware")
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "decoder_output_gram"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    import factorlm
    from factorlm.assets import smollm_dir
    from factorlm.calibration import collect_output_fisher, collect_output_gram, collect_statistics
    from quality import exported_smollm

    torch.set_num_threads(1)  # a shared 2-core machine
    load_before = uptime()
    source = exported_smollm()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent))
    evals = {"test": _ids(tokenizer, "prideprejudice"), "tune": _ids(tokenizer, "persuasion")}
    original = {k: _perplexity(source, ids) for k, ids in evals.items()}
    say(f"original perplexity {original}")
    texts = _emma_chunks(tokenizer)
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "calib-emma.json"
    data.write_text(json.dumps([{"text": t} for t in texts]))
    cache = args.work / "cache"  # cold on a fresh --work: the times are real
    options: dict[str, Any] = {
        "max_samples": CHUNKS, "max_length": CHUNK_TOKENS, "batch_size": 4,
        "cache_dir": cache, "progress": False,
    }  # fmt: skip
    tick = time.perf_counter()
    stats = collect_statistics(source, texts, holdout=True, **options)
    timings = {"gram_s": time.perf_counter() - tick}
    tick = time.perf_counter()
    grams = collect_output_gram(smollm_dir(), source, data, task="lm", **options)
    timings["output_gram_s"] = time.perf_counter() - tick
    gram_bytes = sum(int(h.nbytes) for h in grams.values())
    say(f"{len(grams)} output Grams, {gram_bytes / 2**20:.0f} MiB, {timings}")
    variants: dict[str, Any] = {"loss_aware_full_gram": ("output_gram", grams)}
    if args.diagonal:
        tick = time.perf_counter()
        diagonal = collect_output_fisher(smollm_dir(), source, data, task="lm", **options)
        timings["output_fisher_s"] = time.perf_counter() - tick
        variants["loss_aware"] = ("output_fisher", diagonal)
    points: list[dict[str, Any]] = []
    for ratio in args.ratios:
        for variant, (kind, table) in variants.items():
            stats.output_gram, stats.output_fisher = {}, {}
            setattr(stats, kind, table)
            out = args.work / f"emma-{variant}-{ratio}" / "model.onnx"
            tick = time.perf_counter()
            result = factorlm.compress(
                source, out, method="whiten", ratio=ratio, joint_qkv=False, stats=stats,
                loss_aware=True,
            )  # fmt: skip
            point = {
                "variant": variant,
                "ratio": ratio,
                "achieved_ratio": result.params_after / result.params_before,
                "factorized": result.factorized,
                "compress_s": round(time.perf_counter() - tick, 1),
                **{k: _perplexity(out, ids) for k, ids in evals.items()},
            }
            points.append(point)
            say(json.dumps(point))
    record = {
        "command": "python benchmarks/decoder_output_gram.py " + " ".join(argv or sys.argv[1:]),
        "environment": environment_lines(load_before, uptime()),
        "original": original,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "output_gram_weights": len(grams),
        "output_gram_mib": round(gram_bytes / 2**20, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "points": points,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decoder_output_gram.json").write_text(json.dumps(record, indent=1) + "\n")
    text = markdown(record)
    (args.out / "decoder_output_gram.md").write_text(text)
    print(text)
    return 0


def markdown(record: dict[str, Any]) -> str:
    original, t = record["original"], record["timings"]
    lines = [
        "# Loss-aware whitening with the full output Gram: SmolLM2-135M-Instruct (issue 16)",
        "",
        f"Command: `{record['command']}` (see its docstring for the split).",
        "",
        *record["environment"],
        "",
        f"Statistics (cold, 1 torch thread): Gram {t['gram_s']:.0f} s, full output Gram "
        f"{t['output_gram_s']:.0f} s ({record['output_gram_weights']} weights, "
        f"{record['output_gram_mib']:.0f} MiB float64); peak RSS {record['peak_rss_mib']:.0f} MiB.",
        f"Original perplexity: test (Pride and Prejudice) {original['test']:.2f}, "
        f"tune (Persuasion) {original['tune']:.2f}.",
        "",
        "| variant | linear params kept | test ppl | vs original | tune ppl | vs original | "
        "compress s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in record["points"]:
        lines.append(
            f"| {p['variant']} | {p['ratio']:.0%} | {p['test']:.2f} | "
            f"{p['test'] / original['test'] - 1:+.1%} | {p['tune']:.2f} | "
            f"{p['tune'] / original['tune'] - 1:+.1%} | {p['compress_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
