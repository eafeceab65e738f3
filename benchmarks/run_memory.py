"""Peak resident memory of each stage of ``factorlm run``, from the run's own manifest.

Runs ``factorlm run [CONFIG] -o OUT --force`` (default: the embedded all-MiniLM-L6-v2 job) in a
fresh process, then reads ``OUT/manifest.json``, where every stage records its memory
(``pipeline.memory.StagePeak``: resident MiB at the stage's start, its own peak, what is left
after the stage released what it loaded, and the process's peak so far). Writes a table with the
fp32 model size for scale (the issue's target: the whole run within 3x the fp32 model plus a
fixed overhead).

``--bert`` runs the default job's config with the model replaced instead: a tiny BERT (2 layers,
hidden 128), whose peak is the fixed overhead (imports, ONNX Runtime and its optimizer with almost
no weights), a BERT-base-shaped model (hidden 768, 12 layers, 12 heads, FFN 3072, 110M
parameters, 420 MiB fp32) and, with ``--minilm``, MiniLM again; random weights
(``torch.manual_seed(0)``) with the all-MiniLM-L6-v2 tokenizer (the same uncased BERT vocabulary
of 30522). It reports each job's peak minus the overhead against 3x its fp32 model.
``--small-bench`` keeps the benchmark stage short (one shape, few iterations, fewer evaluation
texts); the output is appended to ``--out`` under a dated heading instead of replacing it.

The benchmark stage measures latency: do not run this while someone else measures speed on the
same machine.

    .venv/bin/python benchmarks/run_memory.py [--config CONFIG.yaml] [--work DIR]
        [--out benchmarks/results/run_memory.md]
    .venv/bin/python benchmarks/run_memory.py --bert [--minilm] [--small-bench] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from _common import machine, publish

__all__ = ["BERT_SHAPES", "fresh_calibration_cache", "main", "make_bert", "stage_rows"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: BertConfig arguments of the random BERT jobs of ``--bert``.
BERT_SHAPES: dict[str, dict[str, int]] = {
    "bert-tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 512,
    },
    "bert-base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
}

#: What ``--small-bench`` changes in the run config: the benchmark stage only.
SMALL_BENCH: dict[str, dict[str, Any]] = {
    "benchmark": {"shapes": ["8x128"], "warmup": 1, "iterations": 3},
    "data": {"eval_samples": 64},
}


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


def make_bert(folder: Path, shape: dict[str, int]) -> Path:
    """A random-weight BertModel of ``shape`` saved with the all-MiniLM-L6-v2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from factorlm.assets import minilm_dir

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, **shape)
    BertModel(config).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(folder)
    return folder


def fresh_calibration_cache(folder: Path) -> dict[str, str]:
    """The environment of a run whose calibration cache is new and empty: ``FACTORLM_CACHE`` is
    ``folder``, holding links to every entry of the real cache root except ``calibration``.

    Why: calibration results are cached by the model's digest, and the BERT jobs' random models
    are the same every time (seed 0), so a second run would measure loading a cached statistics
    file (BERT-base: 1,665 MiB) instead of calibrating (2,559 MiB).
    """
    from factorlm._common.files import cache_root

    real = cache_root()
    folder.mkdir(parents=True, exist_ok=True)
    for entry in real.iterdir() if real.is_dir() else ():
        link = folder / entry.name
        if entry.name != "calibration" and not link.exists():
            link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    shutil.rmtree(folder / "calibration", ignore_errors=True)
    return {**os.environ, "FACTORLM_CACHE": str(folder)}


def _run_job(
    config: Path | None, out: Path, env: dict[str, str] | None = None
) -> tuple[list[str], int, float, dict[str, Any]]:
    """``factorlm run [config] -o out --force`` in a fresh process: command, status, wall, manifest."""
    command = [str(Path(sys.executable).with_name("factorlm")), "run"]
    if config is not None:
        command.append(str(config))
    command += ["-o", str(out), "--force"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: a goal failed, the stages still ran
        raise SystemExit(f"factorlm run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return command, done.returncode, wall, manifest


def _stage_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| stage | seconds | RSS at start | stage peak | RSS after release | process peak so far |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['seconds']:.1f} | {r['start_rss_mib']:.0f} MiB | "
            f"{r['peak_rss_mib']:.0f} MiB | {r['end_rss_mib']:.0f} MiB | "
            f"{r['process_peak_rss_mib']:.0f} MiB |"
        )
    return lines


def _bert_jobs(args: argparse.Namespace, argv: list[str]) -> int:
    """The tiny-BERT overhead, BERT-base (and MiniLM) jobs; appends one section to ``--out``."""
    import yaml

    work = args.work or Path(tempfile.mkdtemp(prefix="factorlm-run-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    jobs = ["bert-tiny", "bert-base", *(["minilm"] if args.minilm else [])]
    before = machine()
    results: dict[str, dict[str, Any]] = {}
    command: list[str] = []
    for job in jobs:
        config: dict[str, Any] = dict(SMALL_BENCH) if args.small_bench else {}
        if job in BERT_SHAPES:
            config["model"] = str(make_bert(work / job / "model", BERT_SHAPES[job]))
        path = work / job / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=True), encoding="utf-8")
        env = fresh_calibration_cache(work / job / "cache")
        command, status, wall, manifest = _run_job(path, work / job / "run", env)
        rows = stage_rows(manifest)
        peak = max((r["peak_rss_mib"] or 0.0 for r in rows), default=0.0)
        top = max(rows, key=lambda r: r["peak_rss_mib"] or 0.0)["stage"] if rows else "-"
        model_mib = _model_mib(work / job / "run")
        results[job] = {
            "status": status,
            "wall": wall,
            "rows": rows,
            "peak": peak,
            "top": top,
            "model": model_mib,
            "config": config,
        }
        print(
            f"{job}: peak {peak:.0f} MiB ({top}), model {model_mib} MiB, wall {wall:.0f} s",
            flush=True,
        )
    overhead = results["bert-tiny"]["peak"]
    lines = [
        "",
        f"## `--bert`: BERT-base against 3x its fp32 size plus a fixed overhead ({date.today()})",
        "",
        f"Command: `python benchmarks/run_memory.py {' '.join(argv)}`; each job is "
        f"`factorlm run JOB/config.yaml -o JOB/run --force` in a fresh process (last: "
        f"`{' '.join(['factorlm', *command[1:]])}`).  ",
        "Config: the default job's (MiniLM's embedded config) with `model:` replaced"
        + (
            f", and the benchmark kept small: `{json.dumps(SMALL_BENCH)}`"
            if args.small_bench
            else ""
        )
        + ". BERT models: `BertConfig` + `BertModel`, random weights (`torch.manual_seed(0)`), "
        "with the all-MiniLM-L6-v2 tokenizer. Each job calibrates for real: its calibration "
        "cache starts empty (`FACTORLM_CACHE` = `JOB/cache`, linking the rest of the cache).  ",
        f"Machine (before): {before}  ",
        f"Machine (after): {machine()}  ",
        f"Fixed overhead = the tiny BERT's (2 layers, hidden 128) whole-run peak: "
        f"{overhead:.0f} MiB.",
        "",
        "| job | fp32 model | whole-run peak | stage setting it | peak − overhead | 3x model | "
        "target met | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for job, r in results.items():
        model = r["model"] or float("nan")
        extra = r["peak"] - overhead
        met = "—" if job == "bert-tiny" else ("yes" if extra <= 3 * model else "**no**")
        lines.append(
            f"| {job} | {model:.1f} MiB | {r['peak']:.0f} MiB | {r['top']} | {extra:.0f} MiB "
            f"({extra / model:.1f}x) | {3 * model:.0f} MiB | {met} | {r['wall']:.0f} s |"
        )
    for job, r in results.items():
        lines += ["", f"### {job} (exit status {r['status']})", "", *_stage_table(r["rows"])]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as handle:
        handle.write(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "run_memory.md")
    parser.add_argument("--bert", action="store_true", help="tiny BERT + BERT-base jobs")
    parser.add_argument("--minilm", action="store_true", help="with --bert: MiniLM too")
    parser.add_argument("--small-bench", action="store_true", help="with --bert: short benchmark")
    args = parser.parse_args(argv)
    if args.bert:
        return _bert_jobs(args, list(sys.argv[1:] if argv is None else argv))
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
        *_stage_table(rows),
    ]
    if rows:
        lines += ["", f"Method: {rows[0]['method']}."]
    publish(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
