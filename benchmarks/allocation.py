"""Rank allocation on the real all-MiniLM-L6-v2: uniform vs the earlier greedy vs the new optimum.

Every variant factorizes the same 36 linear weights under the same parameter budget (``ratio`` of
their parameters, factors' overhead included) and differs only in how ranks are spread:

- ``uniform``: the same fraction of every weight (ASSETS.md's reference numbers).
- ``greedy-abs``: the earlier greedy from dense, absolute (data-aware) errors.
- ``optimal-abs``: the exact knapsack optimum of the summed absolute errors.
- ``optimal-rel``: the exact optimum of the summed *relative* errors (the default).
- ``lagrangian-rel``: the convex-hull (λ sweep) allocation with fill-back, relative errors.
- ``optimal-rel-floor`` / ``-floor50``: ``optimal-rel`` with no weight below a quarter / half of
  its break-even rank.

Data (the shuffled reviews asset): rows [0, 256) calibrate the statistics; the held-out set is
``--heldout`` fresh/rotten rows from row ``--heldout-start`` on, disjoint from calibration (and
from the 128 labelled rows FWSVD's Fisher reads in data_aware.py). Fidelity: mean cosine of
mean-pooled embeddings against the original (ONNX Runtime, same token batches). Accuracy: the
benchmark's logistic-regression probe trained on the original's embeddings of one half and
evaluated on the other half for every model.

    .venv/bin/python benchmarks/allocation.py [--methods svd whiten] [--ratios 0.75 0.6 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, publish

__all__ = [
    "VARIANTS",
    "add_heldout_arguments",
    "compress_variant",
    "evaluate",
    "heldout_file",
    "main",
    "prepare",
    "write_results",
]

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent

#: name -> make_plan keyword arguments
VARIANTS: dict[str, dict[str, Any]] = {
    "uniform": {"allocation": "uniform", "min_fraction": 0.0},
    "greedy-abs": {"allocation": "greedy", "error_scale": "absolute", "min_fraction": 0.0},
    "optimal-abs": {"allocation": "optimal", "error_scale": "absolute", "min_fraction": 0.0},
    "optimal-rel": {"allocation": "optimal", "error_scale": "relative", "min_fraction": 0.0},
    "lagrangian-rel": {"allocation": "lagrangian", "error_scale": "relative", "min_fraction": 0.0},
    "optimal-rel-floor": {"allocation": "optimal", "error_scale": "relative", "min_fraction": 0.25},
    "optimal-rel-floor50": {
        "allocation": "optimal",
        "error_scale": "relative",
        "min_fraction": 0.5,
    },
}


def add_heldout_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """``--heldout-start``, ``--heldout``, ``--work`` and ``--out`` (default ``results/<out>``)."""
    parser.add_argument("--heldout-start", type=int, default=2000)
    parser.add_argument("--heldout", type=int, default=600)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / out)


def prepare(args: argparse.Namespace, prefix: str) -> tuple[Path, Path, Path]:
    """The work folder (``--work`` or a new temporary one), the exported MiniLM, the held-out file."""
    from factorlm.assets import exported_minilm

    work = args.work or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    source = exported_minilm()
    return work, source, heldout_file(work, args.heldout_start, args.heldout)


def write_results(out: Path, record: dict[str, Any], lines: list[str]) -> None:
    """``record`` as JSON beside ``out``, ``lines`` as the Markdown at ``out`` (and printed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    publish(out, "\n".join(lines) + "\n")


def heldout_file(folder: Path, start: int, count: int) -> Path:
    """``count`` fresh/rotten reviews from row ``start`` on, as JSONL in ``folder``."""
    from factorlm.assets import reviews_path
    from factorlm.data import iter_records

    rows = []
    for index, record in enumerate(iter_records(reviews_path())):
        if index < start or record.get("label") not in ("fresh", "rotten"):
            continue
        if str(record.get("text", "")).strip():
            rows.append({"text": record["text"], "label": record["label"]})
        if len(rows) == count:
            break
    path = folder / "heldout.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def compress_variant(
    source: Path, target: Path, *, method: str, ratio: float, stats: Any, **options: Any
) -> dict[str, Any]:
    """Compress ``source`` to ``target`` with planner ``options``; return the budget figures."""
    from factorlm._common.files import copy_sidecars
    from factorlm.compression import compress

    result = compress(source, target, method=method, ratio=ratio, stats=stats, **options)
    copy_sidecars(source, target.parent)
    ranks = [w.rank for w in result.plan.weights.values() if w.rank is not None]
    return {
        "achieved_ratio": result.params_after / result.params_before,
        "factorized": result.factorized,
        "dense": len(result.plan.dense),
        "ranks": f"{min(ranks)}-{max(ranks)}" if ranks else "-",
    }


def evaluate(
    models: dict[str, Path],
    heldout: Path,
    tokenizer_dir: Path,
    *,
    include_details: bool = False,
    intervals: bool = False,
) -> dict[str, Any]:
    """Probe accuracy and mean pooled cosine of each model vs the first (the original).

    Shared by data_aware.py, recovery.py and minilm_loss_aware.py; ``include_details`` adds the
    probe's split details under ``"task"``; ``intervals`` adds each candidate's paired-bootstrap
    interval of the accuracy drop in points (``"drop_interval"``, 95 %) and its prediction
    agreement with the original (``"agreement"``).
    """
    from factorlm._common.text import TextTokenizer
    from factorlm.bench.accuracy import FidelityAccumulator
    from factorlm.bench.runners import OrtRunner
    from factorlm.bench.tasks import classification_task, load_dataset

    tok = TextTokenizer(tokenizer_dir)
    dataset = load_dataset(heldout, labels=["fresh", "rotten"])
    runners = [OrtRunner(path, name=name) for name, path in models.items()]
    fidelity = [FidelityAccumulator() for _ in runners[1:]]
    with contextlib.ExitStack() as stack:
        for runner in runners:
            stack.enter_context(runner)
        task = classification_task(runners, tok, dataset, seed=0, fidelity=fidelity)
    scores = [task["reference"], *task["candidates"].values()]
    cosines = [1.0] + [acc.result()["last_hidden_state"]["pooled_cosine_mean"] for acc in fidelity]
    out: dict[str, Any] = {"task": task["details"]} if include_details else {}
    for name, score, cos in zip(models, scores, cosines, strict=True):
        out[name] = {"accuracy": float(score), "pooled_cosine": float(cos)}
        if intervals and name in task["drop_interval"]:
            out[name]["drop_interval"] = [float(v) for v in task["drop_interval"][name]]
            out[name]["agreement"] = float(task["agreement"][name])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["svd", "whiten"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.75, 0.6, 0.5])
    parser.add_argument(
        "--variants", nargs="+", default=[v for v in VARIANTS if v != "lagrangian-rel"]
    )
    add_heldout_arguments(parser, "allocation.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from factorlm.assets import reviews_path
    from factorlm.calibration import collect_statistics

    work, source, heldout = prepare(args, "factorlm-allocation-")
    stats = collect_statistics(source, reviews_path(), max_samples=256, progress=False)
    before = machine()
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for method in args.methods:
        for ratio in args.ratios:
            done = work / f"{method}-{ratio}.json"  # variants already measured in this --work
            known = json.loads(done.read_text()) if done.is_file() else []
            missing = [v for v in args.variants if v not in {r["variant"] for r in known}]
            models: dict[str, Path] = {"original": source}
            budget: dict[str, dict[str, Any]] = {}
            for variant in missing:
                target = work / f"{method}-{ratio}-{variant}" / "model.onnx"
                budget[variant] = compress_variant(
                    source, target, method=method, ratio=ratio, stats=stats, **VARIANTS[variant]
                )
                models[variant] = target
            metrics = evaluate(models, heldout, source.parent) if missing else {}
            for variant in missing:
                known.append(
                    {"method": method, "ratio": ratio, "variant": variant, **budget[variant],
                     **metrics[variant], "original_accuracy": metrics["original"]["accuracy"]}
                )  # fmt: skip
                print(json.dumps(known[-1]), flush=True)
            done.write_text(json.dumps(known, indent=2))
            by_variant = {r["variant"]: r for r in known}
            rows += [by_variant[v] for v in args.variants]
    seconds = time.perf_counter() - start
    record = {
        "command": "python " + " ".join(["benchmarks/allocation.py", *(argv or sys.argv[1:])]),
        "machine_before": before,
        "machine_after": machine(),
        "seconds": seconds,
        "heldout": f"{args.heldout} fresh/rotten rows from row {args.heldout_start}",
        "calibration": "rows 0-255 (collect_statistics, max_samples=256)",
        "rows": rows,
    }
    lines = [
        "# Rank allocation on all-MiniLM-L6-v2 (36 linear weights, 10.6M parameters)",
        "",
        f"Command: `{record['command']}` (after `factorlm assets`); {seconds:.0f} s.",
        f"Machine before: {before}",
        f"Machine after: {record['machine_after']}",
        f"Calibration: {record['calibration']}; held-out: {record['heldout']} (probe: logistic "
        "regression on the original's embeddings of one half, evaluated on the other half).",
        "Ratio = kept fraction of the 36 linear weights' parameters (factors included); "
        "'achieved' is params_after / params_before of the plan over every targeted weight.",
        "",
        "| method | ratio | allocation | achieved | factorized / dense | ranks | pooled cosine | probe acc % (orig) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['ratio']} | {row['variant']} | {row['achieved_ratio']:.3f} | "
            f"{row['factorized']} / {row['dense']} | {row['ranks']} | {row['pooled_cosine']:.4f} | "
            f"{row['accuracy']:.1f} ({row['original_accuracy']:.1f}) |"
        )
    write_results(args.out, record, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
