"""Peak memory of ``factorlm export`` and ``factorlm compress`` on a 1.1B-parameter Llama.

No model of that size can be fetched here, so the script builds one: TinyLlama-1.1B's shapes
(hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000, untied head) with
random fp32 weights (``LlamaConfig`` + ``LlamaForCausalLM``, ``torch.manual_seed``), saved with
``save_pretrained`` next to a stand-in tokenizer (SmolLM2's, a Llama-family BPE; its ids on the
exporter's validation sentences are below 32000, but other text can reach 49151, so this model
cannot be calibrated on arbitrary text with it). Then, each step in its own process, measured by
``_common.run_with_peak`` (the command's own maximum resident set size from ``/usr/bin/time``,
psutil polling of its process tree as a cross-check; never ``ru_maxrss`` of this process):

1. build: the random model and ``save_pretrained`` (safetensors);
2. ``factorlm export DIR -o ONNX --task text-generation-with-past`` (optimum; the graph is over
   2 GB, so its weights go to external data; validated against PyTorch);
3. ``factorlm compress ONNX/model.onnx -o OUT/model.onnx --method svd --ratio 0.8`` (weights
   streamed from the external data, factors spilled, output written with external data);
4. the imports of ``factorlm compress`` alone (its fixed overhead).

The table gives each peak against the fp32 model size and its largest single weight. Everything
lives under ``--work`` (default /tmp/bigmodel, ~13 GB of disk at the peak) and is deleted at the
end unless ``--keep``. Each step refuses to start when the machine's available memory is below
what it is expected to need (``--min-free-gb``), so a shared machine is not driven into the OOM
killer.

    .venv/bin/python benchmarks/big_model_memory.py [--work /tmp/bigmodel] [--layers 22]
        [--method svd] [--ratio 0.8] [--keep] [--out benchmarks/results/big_model_memory.md]

``--run`` runs the whole ``factorlm run`` job instead, then compresses from its statistics on
a local Ray; with ``--ray-calibrate`` it gathers the statistics again on a local Ray (within the
default Gram budget) and compares them with the run's, instead of that compress.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from _common import machine, publish, run_with_peak

__all__ = ["main", "model_sizes"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOKENIZER = Path.home() / ".cache" / "factorlm" / "models" / "SmolLM2-135M-Instruct"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_BUILD = """
import json, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
shape = json.loads(sys.argv[2])
config = LlamaConfig(
    hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
    num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
    num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
)
torch.manual_seed(0)
start = time.perf_counter()
model = LlamaForCausalLM(config).eval()
params = sum(p.numel() for p in model.parameters())
model.save_pretrained(sys.argv[1], safe_serialization=True)
print(json.dumps({"params": params, "seconds": time.perf_counter() - start}))
"""

EMMA = Path.home() / ".cache" / "factorlm" / "data" / "austen" / "emma.txt"

#: ``--run``'s job: real text for calibration (its first rows) and perplexity (its last rows);
#: a short benchmark (the model is random, so its perplexity is only a smoke figure).
RUN_CONFIG: dict[str, Any] = {
    "export": {"task": "text-generation-with-past"},
    "data": {"labels": None, "calibration_samples": 480, "eval_samples": 16},
    "calibration": {"max_length": 128, "batch_size": 8},
    "compress": {"method": "whiten"},
    "benchmark": {
        "task": "perplexity",
        "shapes": ["1x64"],
        "prefill_lengths": [64],
        "decode_past": [64],
        "decode_batches": [1],
        "warmup": 1,
        "iterations": 3,
    },
}

_IMPORTS = """
import factorlm.cli, factorlm.compression, factorlm.streaming, numpy, scipy.linalg, onnx, onnx_ir
print("{}")
"""

#: ``--ray-calibrate``: the run's calibrate stage's statistics, gathered on a local Ray (one
#: worker per CPU) into a fresh cache folder: argv = model, data, cache folder, settings (JSON).
_RAY_CALIBRATE = """
import json, logging, sys, time
from pathlib import Path
from factorlm.calibration import collect_statistics
logging.basicConfig(level=logging.WARNING, format="%(message)s")
logging.getLogger("factorlm.calibration.capture").setLevel(logging.INFO)  # the Ray plan
start = time.perf_counter()
stats = collect_statistics(
    Path(sys.argv[1]), Path(sys.argv[2]), cache_dir=Path(sys.argv[3]), ray_address="auto",
    progress=False, **json.loads(sys.argv[4]),
)
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": stats.tokens}))
"""


def model_sizes(onnx_path: Path) -> dict[str, Any]:
    """fp32 bytes of every initializer, the largest one and the files on disk (MiB)."""
    import numpy as np
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    sizes = {
        t.name: int(np.prod(t.dims, dtype=np.int64)) * 4
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    }
    largest = max(sizes, key=sizes.__getitem__)
    dims = next(list(t.dims) for t in model.graph.initializer if t.name == largest)
    disk = sum(p.stat().st_size for p in onnx_path.parent.iterdir() if p.is_file())
    return {
        "fp32_mib": sum(sizes.values()) / 2**20,
        "largest_mib": sizes[largest] / 2**20,
        "largest": f"{largest} {dims}",
        "disk_mib": disk / 2**20,
        "initializers": len(sizes),
    }


def _available_gb() -> float:
    """MemAvailable of the machine in GB (what can be used without swapping others out)."""
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def _step(
    name: str, argv: list[str], need_gb: float, env: dict[str, str], ok: tuple[int, ...] = (0,)
) -> dict[str, Any]:
    """Run one measured step; stop the benchmark on failure or when memory is short."""
    free = _available_gb()
    if free < need_gb:
        raise SystemExit(
            f"{name}: only {free:.1f} GB available, the step may need {need_gb:.1f} GB; not "
            "started (rerun when the machine is quieter, or lower --min-free-gb)."
        )
    shown = " ".join(
        "<code>" if "\n" in a else Path(a).name if i == 0 else a for i, a in enumerate(argv)
    )
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shown[:160]}", flush=True)
    before = machine()
    with _LowestAvailable() as lowest:
        done = run_with_peak(argv, cwd=ROOT, env=env)
    print(
        f"[{time.strftime('%H:%M:%S')}] {name}: exit {done['returncode']}, "
        f"{done['wall_s']:.0f} s, peak {done['peak_mib']:.0f} MiB",
        flush=True,
    )
    if done["returncode"] not in ok:
        raise SystemExit(f"{name} failed ({done['returncode']}):\n{done['stderr'][-4000:]}")
    return {
        **done,
        "available_gb_before": free,
        "available_gb_low": lowest.gb,
        "machine_before": before,
    }


class _LowestAvailable:
    """The machine's lowest MemAvailable (GB) while the block runs, sampled every 0.2 s.

    Why: a Ray step's memory is spread over its workers and the object store, whose shared
    pages the process-tree sum counts more than once; the machine's own figure does not (the
    drop from ``available before`` bounds what the step took, other jobs included).
    """

    def __init__(self) -> None:
        import threading

        self.gb = _available_gb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.gb = min(self.gb, _available_gb())

    def __enter__(self) -> _LowestAvailable:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _run_flow(
    args: argparse.Namespace,
    shape: dict[str, int],
    hf_dir: Path | None,
    factorlm: str,
    env: dict[str, str],
    model_gb: float,
    command: str,
) -> list[str]:
    """``--run``: the whole job, then compress from its statistics locally and on Ray."""
    import yaml

    from run_memory import stage_rows

    config = {**RUN_CONFIG, "model": str(hf_dir)}
    config["data"] = {**RUN_CONFIG["data"], "path": str(args.data)}
    config["compress"] = {**RUN_CONFIG["compress"], "ratio": args.ratio}
    if args.from_run is None:
        assert hf_dir is not None
        config_path = args.work / "config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=True), encoding="utf-8")
        run_dir = args.work / "run"
        run = _step(
            "factorlm run",
            [factorlm, "run", str(config_path), "-o", str(run_dir), "--force", "-q"],
            3.2 * model_gb,
            env,
            ok=(0, 1),  # 1: a goal failed (none is set) — the stages still ran
        )
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        shutil.rmtree(hf_dir)  # disk: only the run's export and statistics are needed from here
    else:
        run_dir = args.from_run
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        stages = stage_rows(manifest)
        run = {
            "wall_s": sum(r["seconds"] or 0 for r in stages),
            "peak_mib": max(r["process_peak_rss_mib"] for r in stages),
            "returncode": "not recorded (the run was made before, from the manifest)",
            "machine_before": "not recorded (see the manifest's times)",
        }
    exported = next(run_dir.glob("*/model.onnx"), None)
    exported = next(
        (p for p in sorted(run_dir.glob("*/model.onnx")) if "export" in p.parent.name), exported
    )
    stats = next(iter(sorted(run_dir.glob("*/stats.npz"))), None)
    if exported is None or stats is None:
        raise SystemExit(f"{run_dir} has no exported model or statistics to compress again.")
    sizes = model_sizes(exported)
    # The local path is the run's own compress stage (same export, statistics and options);
    # Ray's is the same compress in its own process, one worker per CPU.
    workers = os.cpu_count() or 1
    stage = next(r for r in stage_rows(manifest) if r["stage"] == "compress")
    compressed: dict[str, dict[str, Any]] = {
        "local (the run's compress stage)": {
            "wall_s": stage["seconds"],
            "peak_mib": stage["peak_rss_mib"],
            "polled_mib": None,
            "out": run_dir / "compress",
        }
    }
    calibrated: list[str] = []
    if args.ray_calibrate:
        calibrated = _ray_calibration(
            args, run_dir, exported, stats, manifest, env, model_gb, sizes["fp32_mib"]
        )
    else:
        out = args.work / "compress-ray"
        argv = [factorlm, "compress", str(exported), "--stats", str(stats), "-o", str(out)]
        argv += ["--method", "whiten", "--ratio", str(args.ratio), "-q", "--ray", "auto"]
        label = f"Ray, {workers} workers (`compress --stats --ray auto`)"
        compressed[label] = _step("compress (Ray)", argv, 1.0 * model_gb, env)
        same = _same_outputs(run_dir / "compress" / "model.onnx", out / "model.onnx")
    imports = _step("imports", [sys.executable, "-c", _IMPORTS], 0.0, env)
    model_mib = sizes["fp32_mib"]
    rows = stage_rows(manifest)
    lines = [
        "## `factorlm run` on the 1.1B-parameter Llama, whitened at "
        f"{args.ratio:.0%} with calibration on real text",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine (before): {run['machine_before']}  ",
        f"Model: {sizes['fp32_mib'] * 2**20 / 4:,.0f} parameters ({json.dumps(shape)}; the "
        "vocabulary is the "
        f"stand-in tokenizer's, so that real text can be calibrated on), fp32 initializers "
        f"{model_mib:,.0f} MiB; largest weight {sizes['largest']} {sizes['largest_mib']:.0f} "
        f"MiB. Calibration and perplexity text: {args.data.name} (first / last rows). "
        f"Run config: `{json.dumps(config, sort_keys=True)}`.  ",
        f"Whole run: {run['wall_s']:.0f} s, peak RSS {run['peak_mib']:,.0f} MiB "
        f"({run['peak_mib'] / model_mib:.2f}x the fp32 model; the issue's allowance is 3x + a "
        f"fixed overhead = {3 * model_mib:,.0f} MiB + overhead), exit {run['returncode']}.",
        "",
        "| stage | seconds | RSS at start | stage peak | stage peak / model |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['seconds']:.0f} | {r['start_rss_mib']:,.0f} MiB | "
            f"{r['peak_rss_mib']:,.0f} MiB | {r['peak_rss_mib'] / model_mib:.2f}x |"
        )
    if calibrated:
        return [*lines, "", *calibrated]
    lines += [
        "",
        "Compress from the run's export and statistics: locally (the run's stage: its own peak, "
        "read from the manifest) and on a local Ray in its own process (peak = the driver's "
        "maximum RSS; polled = its process tree, Ray's workers included). Fixed overhead "
        f"(imports of compress): {imports['peak_mib']:,.0f} MiB.",
        "",
        "| compress | wall | peak RSS | polled (tree) | peak / model |",
        "|---|---|---|---|---|",
    ]
    for label, step in compressed.items():
        polled = "-" if step["polled_mib"] is None else f"{step['polled_mib']:,.0f} MiB"
        lines.append(
            f"| {label} | {step['wall_s']:.0f} s | {step['peak_mib']:,.0f} MiB | {polled} | "
            f"{step['peak_mib'] / model_mib:.2f}x |"
        )
    lines += ["", f"Local and Ray outputs: {same}.", ""]
    return lines


def _ray_calibration(
    args: argparse.Namespace,
    run_dir: Path,
    exported: Path,
    stats: Path,
    manifest: dict[str, Any],
    env: dict[str, str],
    model_gb: float,
    model_mib: float,
) -> list[str]:
    """``--ray-calibrate``: the run's calibrate stage again on a local Ray; its table lines.

    Same export, calibration split and settings as the stage (``RUN_CONFIG``), a fresh cache
    folder; the statistics are compared with the run's Gram for Gram.
    """
    from run_memory import stage_rows

    data = run_dir / "data" / "calibration.jsonl"
    if not data.is_file():
        raise SystemExit(f"{run_dir} has no calibration split ({data}).")
    settings = {
        "max_samples": RUN_CONFIG["data"]["calibration_samples"],
        "max_length": RUN_CONFIG["calibration"]["max_length"],
        "batch_size": RUN_CONFIG["calibration"]["batch_size"],
    }
    cache = args.work / "calibrate-ray"
    shutil.rmtree(cache, ignore_errors=True)
    argv = [sys.executable, "-c", _RAY_CALIBRATE, str(exported), str(data), str(cache)]
    # two workers' ORT weights and a share of the Gram budget each, the driver's chunk
    need = args.min_free_gb or 3.0 * model_gb
    ray = _step("calibrate (Ray)", [*argv, json.dumps(settings)], need, env)
    (remote,) = sorted(cache.glob("stats-*.npz"))
    same = _same_statistics(stats, remote)
    shutil.rmtree(cache, ignore_errors=True)
    stage = next(r for r in stage_rows(manifest) if r["stage"] == "calibrate")
    workers = os.cpu_count() or 1
    low = ray["available_gb_before"] - ray["available_gb_low"]
    plan = next((x for x in ray["stderr"].splitlines() if "Ray workers" in x), "(not logged)")
    tree = ray["polled_mib"] or 0.0
    return [
        "Calibrate from the run's export and calibration split "
        f"(`collect_statistics(..., {json.dumps(settings)})`): locally (the run's stage, read "
        'from the manifest) and on a local Ray in its own process (`ray_address="auto"`, '
        f"{workers} workers, the default Gram budget: the model's fp32 size). Peak = the "
        "driver's maximum RSS; polled = its process tree's summed RSS (Ray's workers "
        "included; pages they share are counted more than once); available drop = the "
        "machine's MemAvailable before the step minus its lowest during it.",
        "",
        "| calibrate | wall | peak RSS | polled (tree) | available drop | peak / model | "
        "tree / model |",
        "|---|---|---|---|---|---|---|",
        f"| local (the run's calibrate stage) | {stage['seconds']:.0f} s | "
        f"{stage['peak_rss_mib']:,.0f} MiB | - | - | {stage['peak_rss_mib'] / model_mib:.2f}x "
        "| - |",
        f"| Ray, {workers} workers | {ray['wall_s']:.0f} s | {ray['peak_mib']:,.0f} MiB | "
        f"{tree:,.0f} MiB | {low:.1f} GB | {ray['peak_mib'] / model_mib:.2f}x | "
        f"{tree / model_mib:.2f}x |",
        "",
        f"Ray's plan: {plan.strip()}.  ",
        f"Local and Ray statistics: {same}.",
        "",
    ]


def _same_statistics(first: Path, second: Path) -> str:
    """Whether two statistics files hold the same tables, array for array (memory-mapped, one
    array at a time), and else the largest relative difference."""
    import numpy as np

    from factorlm.calibration import CalibrationStats

    a = CalibrationStats.load(first, mmap=True)
    b = CalibrationStats.load(second, mmap=True)
    if a.tokens != b.tokens or a.gram.keys() != b.gram.keys():
        return f"different tokens ({a.tokens}, {b.tokens}) or weights"
    differ, worst = 0, 0.0
    for table in ("gram", "mean_abs", "gram_heldout"):
        mine, theirs = getattr(a, table), getattr(b, table)
        for name, value in mine.items():
            other = theirs[name]
            if not np.array_equal(value, other):
                differ += 1
                scale = float(np.abs(value).max()) or 1.0
                worst = max(worst, float(np.abs(np.asarray(value) - other).max()) / scale)
    total = len(a.gram) + len(a.mean_abs) + len(a.gram_heldout)
    if not differ:
        return f"identical ({total} arrays, value for value; {a.tokens} tokens)"
    return f"{differ} of {total} arrays differ, by at most {worst:.1e} of their largest value"


def _same_outputs(first: Path, second: Path) -> str:
    """Whether two compressed models hold the same nodes and initializers (names, shapes, bytes),
    read one tensor at a time from their external data."""
    import onnx
    from onnx import numpy_helper

    a = onnx.load(str(first), load_external_data=False)
    b = onnx.load(str(second), load_external_data=False)
    ta = {t.name: t for t in a.graph.initializer}
    tb = {t.name: t for t in b.graph.initializer}
    if ta.keys() != tb.keys():
        return "different initializer names"
    differ = 0
    for name, tensor in ta.items():
        x = numpy_helper.to_array(tensor, base_dir=str(first.parent))
        y = numpy_helper.to_array(tb[name], base_dir=str(second.parent))
        differ += x.shape != y.shape or x.tobytes() != y.tobytes()
    nodes_same = [(n.op_type, list(n.input)) for n in a.graph.node] == [
        (n.op_type, list(n.input)) for n in b.graph.node
    ]
    if not differ and nodes_same:
        return f"identical ({len(ta)} initializers, byte for byte; same nodes)"
    return f"{differ} of {len(ta)} initializers differ; nodes same: {nodes_same}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bigmodel"))
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--method", default="svd")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--task", default="text-generation-with-past")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    parser.add_argument(
        "--min-free-gb",
        type=float,
        default=None,
        help="available memory (GB) a step needs to start (default: 1.5x the fp32 model for "
        "build, 2.8x for export, 1x for compress)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the models under --work")
    parser.add_argument(
        "--run",
        action="store_true",
        help="instead of export + compress: the whole `factorlm run` job on the model (export, "
        "calibration on --data, whitened compress at --ratio, ORT build, benchmark), then "
        "compress from the run's statistics again, locally and on a local Ray (one worker "
        "per CPU) (needs --vocab >= the tokenizer's vocabulary, e.g. 49152 for SmolLM2's)",
    )
    parser.add_argument("--data", type=Path, default=EMMA, help="--run: calibration text")
    parser.add_argument(
        "--ray-calibrate",
        action="store_true",
        help="with --run or --from-run: instead of compressing from the run's statistics on "
        "Ray, gather them again on a local Ray (one worker per CPU, the default Gram budget) "
        "from the run's export and calibration split, and compare them with the run's",
    )
    parser.add_argument(
        "--from-run",
        type=Path,
        default=None,
        help="--run's second half only: read an existing run folder (made with the same "
        "RUN_CONFIG) instead of building the model and running the job",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "big_model_memory.md")
    args = parser.parse_args(argv)
    command = "python benchmarks/big_model_memory.py " + " ".join(argv or sys.argv[1:])
    shape = {
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "vocab": args.vocab,
    }
    h, f, v, kv = (
        args.hidden,
        args.intermediate,
        args.vocab,
        args.kv_heads * args.hidden // args.heads,
    )
    params = 2 * v * h + args.layers * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h) + h
    model_gb = 4 * params / 2**30
    need = {  # measured on the 1.1B model: build 1.1x, export 2.5x, compress 0.25x the model
        "build": args.min_free_gb or 1.5 * model_gb,
        "export": args.min_free_gb or 2.8 * model_gb,
        "compress": args.min_free_gb or 1.0 * model_gb,
    }
    factorlm = str(Path(sys.executable).with_name("factorlm"))
    threads = {k: os.environ.get(k, "1") for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    env = {**os.environ, **threads}  # a shared machine: one BLAS / torch thread unless asked
    hf_dir, onnx_dir, out_dir = args.work / "hf", args.work / "onnx", args.work / "compressed"
    if args.from_run is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        lines = _run_flow(args, shape, None, factorlm, env, model_gb, command)
        publish(args.out, "\n".join([*lines, f"Machine (after): {machine()}", ""]))
        return 0
    marker = args.work / ".big_model_memory"
    if args.work.exists() and any(args.work.iterdir()) and not marker.is_file():
        raise SystemExit(
            f"{args.work} exists and was not made by this script; pass another --work."
        )
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    marker.touch()
    load_before = machine()
    try:
        build = _step(
            "build",
            [sys.executable, "-c", _BUILD, str(hf_dir), json.dumps(shape)],
            need["build"],
            env,
        )
        for name in _TOKENIZER_FILES:
            if (args.tokenizer / name).is_file():
                shutil.copy(args.tokenizer / name, hf_dir / name)
        if args.run:
            lines = _run_flow(args, shape, hf_dir, factorlm, env, model_gb, command)
            publish(args.out, "\n".join([*lines, f"Machine (after): {machine()}", ""]))
            return 0
        export = _step(
            "export",
            [factorlm, "export", str(hf_dir), "-o", str(onnx_dir), "--task", args.task, "-q"],
            need["export"],
            env,
        )
        shutil.rmtree(hf_dir)  # only the ONNX model is needed from here on (disk)
        sizes = model_sizes(onnx_dir / "model.onnx")
        compress_argv = [factorlm, "compress", str(onnx_dir / "model.onnx")]
        compress_argv += ["-o", str(out_dir / "model.onnx"), "--method", args.method]
        compress_argv += ["--ratio", str(args.ratio), "-q"]
        compress = _step("compress", compress_argv, need["compress"], env)
        out_disk = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file()) / 2**20
        imports = _step("imports", [sys.executable, "-c", _IMPORTS], 0.0, env)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    load_after = machine()
    built = json.loads(build["stdout"].strip().splitlines()[-1])
    model_mib, largest_mib = sizes["fp32_mib"], sizes["largest_mib"]
    base = imports["peak_mib"]

    def row(name: str, step: dict[str, Any], note: str) -> str:
        peak, polled = step["peak_mib"], step["polled_mib"]
        seen = "-" if polled is None else f"{polled:,.0f} MiB"
        return (
            f"| {name} | {peak:,.0f} MiB | {seen} | {peak / model_mib:.2f}x | "
            f"{(peak - base) / largest_mib:.1f}x | {step['wall_s']:.0f} s | "
            f"{step['available_gb_before']:.1f} GB | {note} |"
        )

    lines = [
        "# Peak memory on a 1.1B-parameter Llama (TinyLlama-1.1B shapes, random weights)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine (before): {load_before}  ",
        f"Machine (after): {load_after}  ",
        f"Model: {built['params']:,} parameters ({json.dumps(shape)}), fp32 initializers "
        f"{model_mib:,.0f} MiB ({sizes['initializers']} tensors), export on disk "
        f"{sizes['disk_mib']:,.0f} MiB; largest weight {sizes['largest']} {largest_mib:.0f} "
        f"MiB. Tokenizer: {args.tokenizer.name}'s (stand-in). Compressed: method "
        f"{args.method}, ratio {args.ratio}, {out_disk:,.0f} MiB on disk. Threads: "
        f"{', '.join(f'{k}={v}' for k, v in threads.items())}.  ",
        "Peak = the step's own maximum resident set size (`/usr/bin/time`); polled = largest "
        "resident size of its process tree seen every 50 ms (psutil). Fixed overhead = peak of "
        f"importing what compress imports: {base:.0f} MiB.",
        "",
        "| step | peak RSS | polled | peak / model | (peak - overhead) / largest weight | wall | "
        "available before | what |",
        "|---|---|---|---|---|---|---|---|",
        row("build", build, "LlamaForCausalLM(config) in fp32 + save_pretrained"),
        row("export", export, f"factorlm export --task {args.task} (optimum + validation)"),
        row("compress", compress, f"factorlm compress --method {args.method} --ratio {args.ratio}"),
        row("imports", imports, "python -c 'import factorlm.cli, factorlm.compression, ...'"),
        "",
    ]
    publish(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
