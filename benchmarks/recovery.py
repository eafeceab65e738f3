"""Recovery by distillation vs training-free: all-MiniLM-L6-v2 at 60 %, SmolLM2-135M at 80 %.

``--model minilm`` (the default): all-MiniLM-L6-v2 at 60 % of linear parameters.

Data (the shuffled reviews asset): rows [0, 256) calibrate the statistics of the data-aware
plans; rows [0, distill_rows) are the unlabelled distillation texts; the held-out rows start at
``heldout_start`` (fresh/rotten only, ``heldout`` of them), disjoint from both. On the held-out
rows the benchmark's probe (``factorlm.bench.tasks.classification_task``: logistic regression
trained on the *original's* embeddings of one half, every model evaluated on the other half)
gives accuracy, and the mean cosine of mean-pooled embeddings against the original gives
fidelity. Every model is run as ONNX by ONNX Runtime, the recovered one as exported.

Gap closed = (recovered − best training-free) / (original − best training-free).

    .venv/bin/python benchmarks/recovery.py [--steps 2000] [--time-budget 900] [--out benchmarks/results/recovery.md]

``--model smollm``: SmolLM2-135M-Instruct at 80 % of linear parameters (issue 9). The training-free
baseline is ``compress(method="whiten", ratio=0.8)`` with the quality table's calibration (the
first 32 x 256 tokens of *Emma*, the very ``collect_statistics`` call of ``quality.run_smollm``, so
its cache hits); recovery distils that plan (``recover(method="distill")``) on the Austen novels
other than *Pride and Prejudice*, minus the last ``--val-chars`` characters of *Emma* (kept for
tuning hyper-parameters, never trained on), in blocks of ``--max-length`` tokens, with the time
budget counted in process CPU seconds (``clock="cpu"``). Every model is scored as ONNX by ONNX
Runtime exactly as the quality table does: perplexity over the first 8 non-overlapping 512-token
windows of *Pride and Prejudice* (held out: never trained or tuned on), empty KV cache.
Gap closed = (whiten − recovered) / (whiten − original), in log-perplexity and in perplexity.

    .venv/bin/python benchmarks/recovery.py --model smollm [--time-budget 900] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from allocation import evaluate  # same probe + pooled-cosine metrics as the other tables

__all__ = ["main", "run_smollm"]

logger = logging.getLogger(__name__)

# SmolLM2 recovery settings (tuned on the held-back tail of Emma, never on Pride and Prejudice).
SMOLLM_RATIO = 0.8
SMOLLM_STEPS = 48  # schedule horizon (~17-19 CPU s a step here); the CPU budget is the hard cap
SMOLLM_LR = 5e-5
SMOLLM_FEATURE_FRACTION = 0.0
SMOLLM_TEMPERATURE = 1.0
SMOLLM_LM_WEIGHT = 0.0
SMOLLM_VAL_CHARS = 30_000


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


#: Per-model defaults of the options left unset on the command line.
DEFAULTS = {
    "minilm": {"steps": 2000, "lr": 2e-4, "batch_size": 16, "max_length": 64,
               "out": Path("benchmarks/results/recovery.md")},
    "smollm": {"steps": SMOLLM_STEPS, "lr": SMOLLM_LR, "batch_size": 4, "max_length": 256,
               "out": Path("benchmarks/results/recovery_smollm.md")},
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "smollm"), default="minilm")
    parser.add_argument("--steps", type=int, default=None, help="schedule horizon (minilm 2000)")
    parser.add_argument("--time-budget", type=float, default=900.0)
    parser.add_argument("--lr", type=float, default=None, help="minilm 2e-4")
    parser.add_argument("--batch-size", type=int, default=None, help="minilm 16, smollm 4")
    parser.add_argument("--max-length", type=int, default=None, help="minilm 64, smollm 256")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--distill-rows", type=int, default=6000)
    parser.add_argument("--heldout-start", type=int, default=8000)
    parser.add_argument("--heldout", type=int, default=3000)
    parser.add_argument(
        "--feature-fraction",
        type=float,
        default=SMOLLM_FEATURE_FRACTION,
        help="smollm only (minilm keeps recover's default)",
    )
    parser.add_argument("--temperature", type=float, default=SMOLLM_TEMPERATURE, help="smollm only")
    parser.add_argument("--lm-weight", type=float, default=SMOLLM_LM_WEIGHT, help="smollm only")
    parser.add_argument(
        "--val-chars",
        type=int,
        default=SMOLLM_VAL_CHARS,
        help="smollm: tail of Emma kept out of training (for tuning)",
    )
    parser.add_argument(
        "--loss-aware",
        action="store_true",
        help="smollm: baseline compress(..., loss_aware=True) (issue 16)",
    )
    parser.add_argument(
        "--reuse-baseline",
        action="store_true",
        help="smollm: reuse WORK/whiten/model.onnx and its plan if present",
    )
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    logging.basicConfig(level=logging.WARNING)
    if args.model == "smollm":
        return run_smollm(args, argv)

    from factorlm.assets import exported_minilm, minilm_dir, reviews_path
    from factorlm.calibration import collect_statistics
    from factorlm.compression import compress
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
        compress(onnx_model, target, method=method, ratio=0.6, stats=stats, joint_qkv=False)
        from factorlm._common.files import copy_sidecars

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


def _smollm_texts(val_chars: int) -> list[str]:
    """The Austen novels but Pride and Prejudice, Emma without its last ``val_chars`` characters."""
    from factorlm.assets import austen_dir

    texts = []
    for path in sorted(austen_dir().glob("*.txt")):
        if path.stem == "prideprejudice":
            continue  # held out: the evaluation text
        text = path.read_text(encoding="utf-8")
        texts.append(text[:-val_chars] if path.stem == "emma" and val_chars > 0 else text)
    return texts


def _report(step: int, loss: float) -> None:
    if step % 5 == 0:
        print(f"[{time.strftime('%H:%M:%S')}] step {step}, loss {loss:.4f}, process CPU "
              f"{time.process_time():.0f} s", file=sys.stderr, flush=True)  # fmt: skip


def _gap(original: float, baseline: float, recovered: float) -> dict[str, float]:
    """Fraction of the baseline's perplexity gap the recovered model closes (log and linear)."""
    log_gap = math.log(baseline) - math.log(original)
    return {
        "log_perplexity": (math.log(baseline) - math.log(recovered)) / log_gap,
        "perplexity": (baseline - recovered) / (baseline - original),
    }


def run_smollm(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Whiten at 0.8, distil within a CPU budget, perplexity on Pride and Prejudice (see module doc)."""
    import numpy as np
    from transformers import AutoTokenizer

    from factorlm._common.files import copy_sidecars
    from factorlm.assets import smollm_dir
    from factorlm.bench.runners import OrtRunner
    from factorlm.bench.tasks import window_nll
    from factorlm.calibration import collect_statistics
    from factorlm.compression import compress
    from factorlm.recovery import recover
    from quality import (
        SMOLLM_CALIB_CHUNKS,
        SMOLLM_CALIB_TOKENS,
        SMOLLM_WINDOW,
        SMOLLM_WINDOWS,
        _austen_ids,
        exported_smollm,
        uptime,
    )  # fmt: skip

    work = args.work or Path(tempfile.mkdtemp(prefix="factorlm-recovery-smollm-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = uptime()
    source = exported_smollm()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent))
    emma = _austen_ids(tokenizer, "emma")
    chunks = [
        tokenizer.decode(emma[i * SMOLLM_CALIB_TOKENS : (i + 1) * SMOLLM_CALIB_TOKENS])
        for i in range(SMOLLM_CALIB_CHUNKS)
    ]
    stats = collect_statistics(
        source,
        chunks,
        max_samples=SMOLLM_CALIB_CHUNKS,
        max_length=SMOLLM_CALIB_TOKENS,
        batch_size=4,
        progress=False,
    )  # the quality table's call, so the statistics cache hits
    label = "whiten loss-aware" if args.loss_aware else "whiten"
    if args.loss_aware:
        from factorlm.calibration import collect_output_fisher

        stats.output_fisher = collect_output_fisher(
            smollm_dir(), source, chunks, task="lm", max_samples=SMOLLM_CALIB_CHUNKS,
            max_length=SMOLLM_CALIB_TOKENS, batch_size=4, progress=False,
        )  # fmt: skip

    baseline = work / label.replace(" ", "-") / "model.onnx"
    plan = baseline.with_name("model.plan.json")
    reused = args.reuse_baseline and baseline.is_file() and plan.is_file()
    compress_s = 0.0
    if not reused:
        start = time.perf_counter()
        compress(
            source, baseline, method="whiten", ratio=SMOLLM_RATIO, stats=stats, joint_qkv=False,
            loss_aware=args.loss_aware,
        )  # fmt: skip
        copy_sidecars(source, baseline.parent)
        compress_s = time.perf_counter() - start
    print(
        f"{label} baseline {'reused' if reused else 'made'}: {baseline}",
        file=sys.stderr,
        flush=True,
    )

    texts = _smollm_texts(args.val_chars)
    hyper = {
        "method": "distill", "steps": args.steps, "time_budget_s": args.time_budget, "clock": "cpu",
        "threads": args.threads, "batch_size": args.batch_size, "max_length": args.max_length,
        "lr": args.lr, "feature_fraction": args.feature_fraction, "temperature": args.temperature,
        "lm_weight": args.lm_weight, "seed": 0,
    }  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    result = recover(
        smollm_dir(), plan, work / "recovered", data=texts, onnx_model=source, stats=stats,
        checkpoint_every=10, overwrite=True, progress=sys.stderr.isatty(), on_step=_report, **hyper,
    )  # fmt: skip
    recover_wall, recover_cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"recovered model: {result.model}", flush=True)

    ids = _austen_ids(tokenizer, "prideprejudice")

    def perplexity(path: Path) -> float:  # as quality.run_smollm's perplexity()
        with OrtRunner(path, graph_optimization_level="all") as r:
            nll, scored, _ = window_nll(r, ids, window=SMOLLM_WINDOW, max_windows=SMOLLM_WINDOWS)
        return float(np.exp(nll / scored))

    models = {"original": source, label: baseline, f"{label}+distill": result.model}
    ppl = {name: perplexity(path) for name, path in models.items()}
    closed = _gap(ppl["original"], ppl[label], ppl[f"{label}+distill"])
    load_after = uptime()
    record = {
        "command": "python " + " ".join(["benchmarks/recovery.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared",
        "uptime_before": load_before,
        "uptime_after": load_after,
        "split": {
            "calibration": f"Emma, first {SMOLLM_CALIB_CHUNKS} chunks of {SMOLLM_CALIB_TOKENS} tokens",
            "distill": "Austen novels except Pride and Prejudice; Emma without its last "
            f"{args.val_chars} characters (tuning validation)",
            "evaluation": f"Pride and Prejudice, first {SMOLLM_WINDOWS} non-overlapping windows of {SMOLLM_WINDOW} tokens",
        },
        "baseline": {"method": "whiten", "loss_aware": args.loss_aware, "ratio": SMOLLM_RATIO, "path": str(baseline), "reused": reused,
                     "compress_wall_s": round(compress_s, 1)},
        "hyper_parameters": hyper,
        "recovery": {"steps": result.steps_done, "stopped": result.stopped,
                     "train_cpu_s": result.train_cpu_seconds, "train_wall_s": result.train_seconds,
                     "recover_cpu_s": recover_cpu, "recover_wall_s": recover_wall,
                     "stages_wall_s": result.seconds, "final_loss": result.final_loss,
                     "replaced": result.replaced, "tagged_factors": result.tagged_factors,
                     "export_rel_diff": result.max_relative_diff, "model": str(result.model)},
        "perplexity": ppl,
        "gap_closed": closed,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    rec = record["recovery"]
    lines = [
        "# Recovery by distillation: SmolLM2-135M-Instruct at 80 % of linear parameters",
        "",
        f"Command: `{record['command']}` (after `factorlm assets`).",
        f"Machine: {record['machine']}.  ",
        f"Uptime before: `{load_before}`  ",
        f"Uptime after: `{load_after}`",
        "",
        f"Split: calibration {record['split']['calibration']}; distillation {record['split']['distill']}; "
        f"evaluation {record['split']['evaluation']} (held out; ONNX Runtime, ORT_ENABLE_ALL, empty KV cache).",
        f"Baseline: `compress(method='whiten', ratio={SMOLLM_RATIO}, loss_aware={args.loss_aware})` (separate Q/K/V)"
        + (
            " (reused from an earlier run in the same --work folder)."
            if reused
            else f", {compress_s:.0f} s wall."
        ),
        f"Recovery: `recover(..., {', '.join(f'{k}={v!r}' for k, v in hyper.items())})`: "
        f"{rec['steps']} steps (stopped by {rec['stopped']}), training {rec['train_cpu_s']:.0f} CPU s / "
        f"{rec['train_wall_s']:.0f} wall s; whole recover call (apply, train, export) "
        f"{recover_cpu:.0f} CPU s / {recover_wall:.0f} wall s.",
        "",
        "| model | perplexity | vs original |",
        "|---|---|---|",
        *(f"| {n} | {v:.3f} | {(v / ppl['original'] - 1) * 100:+.1f} % |" for n, v in ppl.items()),
        "",
        "Gap closed = (baseline - recovered) / (baseline - original):",
        "",
        "| measured on | gap closed |",
        "|---|---|",
        f"| log-perplexity | {closed['log_perplexity']:.3f} |",
        f"| perplexity | {closed['perplexity']:.3f} |",
        "",
        f"Recovered ONNX: `{result.model}`",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
