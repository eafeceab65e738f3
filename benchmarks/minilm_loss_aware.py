"""Loss-aware whitening on the real all-MiniLM-L6-v2 (issue 16): today's whiten vs output Fishers.

At each ``--ratios`` budget (kept fraction of the 36 linear weights' parameters) it compares:

- ``whiten``: today's default ``compress(method="whiten")`` (relative errors, floor 0.5);
- ``loss-aware/classification``: ``loss_aware=True`` with the output Fisher of a fixed logistic
  probe's cross-entropy on the first ``--fisher-samples`` labelled fresh/rotten reviews
  (``collect_output_fisher(task="classification")``; the encoder has no head);
- ``loss-aware/embedding``: ``loss_aware=True`` with the label-free sensitivity of the
  mean-pooled embedding, ``g_j = Σ_tokens Σ_k (∂e_k/∂y_tj)²``, from ``--probes`` seeded
  Hutchinson probes on the calibration texts (``task="embedding"``): the statistic that fits the
  pooled-cosine metric.
- ``loss-aware/embedding-gram``: the same embedding loss and probes, but the FULL output-gradient
  Gram ``H = Σ_tokens g_t g_tᵀ`` per weight (``collect_output_gram``), so the factorization
  minimises ``‖X (W − M) H^{1/2}‖`` (two-sided whitening) instead of the diagonal weighting.

Loss-aware plans allocate by absolute (loss-unit) errors with the rank floor ``min_fraction``
(default 0.5 of each weight's break-even rank). The floor is chosen per Fisher from
``--min-fractions`` by mean pooled cosine over the ratios on a *tuning* slice of reviews
(``--tune`` fresh/rotten rows from row ``--tune-start``), never on the evaluation rows.

Data (the shuffled reviews asset): Gram from rows [0, 256) (``collect_statistics``), the
embedding Fisher from the same texts, the classification Fisher from the first labelled rows,
tuning rows from 1000, evaluation rows from 2000 (``--heldout``; disjoint from all the others).
Metrics as in ``benchmarks/allocation.py``: mean cosine of mean-pooled embeddings against the
original, and a cross-fitted logistic probe's accuracy with the paired-bootstrap 95 % interval of
its drop (``factorlm.bench.accuracy.paired_bootstrap_drop``) and the prediction agreement.

    .venv/bin/python benchmarks/minilm_loss_aware.py [--work DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from _common import machine
from allocation import add_heldout_arguments, compress_variant, evaluate, heldout_file, prepare
from allocation import write_results as write_files

__all__ = ["main"]

logger = logging.getLogger(__name__)

FISHERS = ("classification", "embedding", "embedding-gram")
DEFAULT_FLOOR = 0.5
MULTIPLE = 8  # CompressOptions.rank_multiple's default, for counting weights at the floor


def _slice_rows(start: int, count: int) -> tuple[int, int]:
    """First and last row index of ``heldout_file(start, count)``'s fresh/rotten rows."""
    from factorlm.assets import reviews_path
    from factorlm.data import iter_records

    first, taken = -1, 0
    for index, record in enumerate(iter_records(reviews_path())):
        if index < start or record.get("label") not in ("fresh", "rotten"):
            continue
        if str(record.get("text", "")).strip():
            first = index if first < 0 else first
            taken += 1
            if taken == count:
                return first, index
    return first, -1


def _floor_count(plan_file: Path, min_fraction: float) -> int:
    """Factorized weights whose rank is the smallest ``min_fraction`` allows (the floor binds)."""
    from factorlm.decompose.rank import break_even_rank, round_rank
    from factorlm.planning import load_plan

    plan = load_plan(plan_file)
    count = 0
    for entry in plan.weights.values():
        if entry.rank is None:
            continue
        even = break_even_rank(int(entry.shape[0]), int(entry.shape[1]))
        count += entry.rank == round_rank(max(1, math.ceil(min_fraction * even)), MULTIPLE)
    return count


def _compress(
    work: Path, source: Path, key: str, ratio: float, stats: Any, options: dict[str, Any]
) -> dict[str, Any]:
    """One compressed model (reused when ``work`` already holds it): budget, time, floor count."""
    from factorlm.compression import plan_path_for

    target = work / "models" / key / "model.onnx"
    done = target.parent / "point.json"
    if done.is_file():
        return dict(json.loads(done.read_text()))
    clock = time.perf_counter()
    point = compress_variant(source, target, method="whiten", ratio=ratio, stats=stats, **options)
    point["compress_seconds"] = time.perf_counter() - clock
    floor = float(options.get("min_fraction", DEFAULT_FLOOR))
    point["at_floor"] = _floor_count(plan_path_for(target), floor)
    point["path"] = str(target)
    done.write_text(json.dumps(point, indent=2))
    return point


def _key(fisher: str, ratio: float, floor: float) -> str:
    """A loss-aware point's model name (and folder)."""
    return f"loss-aware-{fisher}-floor{floor:g}@{ratio:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.6, 0.5])
    parser.add_argument(
        "--min-fractions", nargs="+", type=float, default=[0.5, 0.35, 0.2, 0.1, 0.0]
    )
    parser.add_argument("--fisher-samples", type=int, default=128)
    parser.add_argument("--embedding-samples", type=int, default=256)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--tune-start", type=int, default=1000)
    parser.add_argument("--tune", type=int, default=300)
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes, one ratio, two floors (a smoke test)"
    )
    add_heldout_arguments(parser, "minilm_loss_aware.md")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.ratios, args.min_fractions = args.ratios[-1:], [DEFAULT_FLOOR, 0.0]
        args.fisher_samples, args.embedding_samples, args.probes = 16, 32, 2
        args.tune, args.heldout = 40, 60
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)  # a shared 2-core machine

    from factorlm.assets import minilm_dir, reviews_path
    from factorlm.calibration import (
        collect_output_fisher,
        collect_output_gram,
        collect_statistics,
    )

    work, source, heldout = prepare(args, "factorlm-loss-aware-")
    tune_rows, heldout_rows = (
        _slice_rows(args.tune_start, args.tune),
        _slice_rows(args.heldout_start, args.heldout),
    )
    if not 256 <= tune_rows[0] <= tune_rows[1] < heldout_rows[0]:
        raise SystemExit(f"tuning rows {tune_rows} overlap calibration or evaluation rows")
    (work / "tune").mkdir(exist_ok=True)
    tune = heldout_file(work / "tune", args.tune_start, args.tune)
    before = machine()
    start = time.perf_counter()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    stats: Any = collect_statistics(source, reviews_path(), max_samples=256, progress=False)
    timings["statistics"] = time.perf_counter() - clock
    cache = work / "fisher-cache"  # cold on a fresh --work: the Fisher times are real
    fisher_options: dict[str, dict[str, Any]] = {
        "classification": {
            "task": "classification",
            "labels": ("fresh", "rotten"),
            "max_samples": args.fisher_samples,
        },
        "embedding": {
            "task": "embedding",
            "max_samples": args.embedding_samples,
            "probes": args.probes,
        },
    }
    fisher_options["embedding-gram"] = fisher_options["embedding"]
    per_fisher: dict[str, Any] = {}
    for name, options in fisher_options.items():
        clock = time.perf_counter()
        full = name.endswith("-gram")
        collect = collect_output_gram if full else collect_output_fisher
        table = collect(
            minilm_dir(), source, reviews_path(), cache_dir=cache, progress=False, **options
        )
        timings[f"fisher_{name}"] = time.perf_counter() - clock
        kind = "output_gram" if full else "output_fisher"
        per_fisher[name] = dataclasses.replace(stats, **{kind: table})

    def point(fisher: str | None, ratio: float, floor: float) -> dict[str, Any]:
        if fisher is None:
            return _compress(work, source, f"whiten@{ratio:g}", ratio, stats, {})
        options = {"loss_aware": True, "min_fraction": floor}
        return _compress(
            work, source, _key(fisher, ratio, floor), ratio, per_fisher[fisher], options
        )

    # 1. The floor of each Fisher, chosen on the tuning rows (mean pooled cosine over ratios).
    tuning: list[dict[str, Any]] = []
    for ratio in args.ratios:
        models: dict[str, Path] = {"original": source}
        points = {"whiten": (None, DEFAULT_FLOOR)} | {
            _key(f, ratio, m): (f, m) for f in FISHERS for m in args.min_fractions
        }
        found: dict[str, dict[str, Any]] = {}
        for key, (fisher, floor) in points.items():
            found[key] = point(fisher, ratio, floor)
            models[key] = Path(found[key]["path"])
        metrics = evaluate(models, tune, source.parent)
        for key, (fisher, floor) in points.items():
            tuning.append(
                {"ratio": ratio, "fisher": fisher or "-", "min_fraction": floor,
                 **found[key], **metrics[key]}
            )  # fmt: skip
            print(json.dumps(tuning[-1]), flush=True)
    chosen: dict[str, float] = {}
    for fisher in FISHERS:

        def mean_cosine(floor: float, fisher: str = fisher) -> float:
            rows = [r for r in tuning if r["fisher"] == fisher and r["min_fraction"] == floor]
            return sum(r["pooled_cosine"] for r in rows) / len(rows)

        chosen[fisher] = max(args.min_fractions, key=mean_cosine)

    # 2. The evaluation rows: today's whiten, both Fishers at the default floor and at the chosen one.
    rows: list[dict[str, Any]] = []
    original: dict[str, Any] = {}
    for ratio in args.ratios:
        configs: list[tuple[str | None, float, str]] = [(None, DEFAULT_FLOOR, "default")]
        for fisher in FISHERS:
            configs.append((fisher, DEFAULT_FLOOR, "default"))
            if chosen[fisher] != DEFAULT_FLOOR:
                configs.append((fisher, chosen[fisher], "tuned"))
        models = {"original": source}
        picked: dict[str, tuple[str | None, float, str, dict[str, Any]]] = {}
        for fisher, floor, how in configs:
            key = "whiten" if fisher is None else _key(fisher, ratio, floor)
            picked[key] = (fisher, floor, how, point(fisher, ratio, floor))
            models[key] = Path(picked[key][3]["path"])
        metrics = evaluate(models, heldout, source.parent, intervals=True)
        original = metrics["original"]
        for key, (fisher, floor, how, budget) in picked.items():
            rows.append(
                {"ratio": ratio, "method": "whiten" if fisher is None else "whiten loss_aware",
                 "fisher": fisher or "-", "min_fraction": floor, "floor": how,
                 **budget, **metrics[key]}
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    seconds = time.perf_counter() - start
    command = "python " + " ".join(["benchmarks/minilm_loss_aware.py", *(argv or sys.argv[1:])])
    record = {
        "command": command,
        "machine_before": before,
        "machine_after": machine(),
        "seconds": seconds,
        "timings": timings,
        "calibration": "Gram and embedding Fisher: reviews rows 0-255; classification Fisher: the "
        f"first {args.fisher_samples} labelled fresh/rotten rows",
        "tuning": f"{args.tune} fresh/rotten rows, rows {tune_rows[0]}-{tune_rows[1]}",
        "heldout": f"{args.heldout} fresh/rotten rows, rows {heldout_rows[0]}-{heldout_rows[1]}",
        "probes": args.probes,
        "chosen_min_fraction": chosen,
        "original": original,
        "tuning_rows": tuning,
        "rows": rows,
    }
    write_files(args.out, record, _markdown(record, args))
    return 0


def _markdown(record: dict[str, Any], args: argparse.Namespace) -> list[str]:
    t = record["timings"]
    lines = [
        "# Loss-aware whitening on all-MiniLM-L6-v2 (issue 16)",
        "",
        f"Command: `{record['command']}` (after `factorlm assets`); {record['seconds']:.0f} s in "
        f"all (Gram statistics {t['statistics']:.0f} s, cached after the first run; output "
        f"Fisher: classification {t['fisher_classification']:.0f} s, embedding with "
        f"{record['probes']} probes {t['fisher_embedding']:.0f} s, full output Gram (embedding-gram) "
        f"{t.get('fisher_embedding-gram', 0.0):.0f} s, cold, 1 torch thread).  ",
        f"Machine before: {record['machine_before']}  ",
        f"Machine after: {record['machine_after']}  ",
        f"Calibration: {record['calibration']}. Floor tuning: {record['tuning']}. "
        f"Evaluation: {record['heldout']} (probe: logistic regression on the original's "
        "embeddings, 5-fold cross-fitted; interval: paired bootstrap of the drop vs the "
        "original, 2000 resamples, 95 %).",
        "Compress s = wall time of `compress()` (planning + factorization + writing), not the "
        "statistics. 'at floor' = factorized weights whose rank is the floor's minimum.",
        "",
        "| method | Fisher | ratio | min_fraction | pooled cosine | probe acc % [drop 95 % CI] "
        "| agreement | factorized / dense | ranks | at floor | compress s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| original | - | 1.0 | - | 1.0000 | {record['original']['accuracy']:.1f} | 1.000 | - | - "
        "| - | - |",
    ]
    for r in record["rows"]:
        low, high = r["drop_interval"]
        floor = f"{r['min_fraction']:g}" + (" (tuned)" if r["floor"] == "tuned" else "")
        lines.append(
            f"| {r['method']} | {r['fisher']} | {r['ratio']:g} | {floor} | "
            f"{r['pooled_cosine']:.4f} | {r['accuracy']:.1f} [{low:+.1f}, {high:+.1f}] | "
            f"{r['agreement']:.3f} | {r['factorized']} / {r['dense']} | {r['ranks']} | "
            f"{r['at_floor']} | {r['compress_seconds']:.1f} |"
        )
    lines += [
        "",
        f"## Floor tuning ({record['tuning']}; never the evaluation rows)",
        "",
        "Chosen per Fisher by the mean pooled cosine over the ratios: "
        + ", ".join(f"{k} {v:g}" for k, v in record["chosen_min_fraction"].items())
        + ".",
        "",
        "| Fisher | ratio | min_fraction | pooled cosine (tuning) | probe acc % (tuning) | "
        "factorized / dense | ranks | at floor | compress s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["tuning_rows"]:
        lines.append(
            f"| {r['fisher']} | {r['ratio']:g} | {r['min_fraction']:g} | "
            f"{r['pooled_cosine']:.4f} | {r['accuracy']:.1f} | {r['factorized']} / {r['dense']} "
            f"| {r['ranks']} | {r['at_floor']} | {r['compress_seconds']:.1f} |"
        )
    del args
    return lines


if __name__ == "__main__":
    sys.exit(main())
