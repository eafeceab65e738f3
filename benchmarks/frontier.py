"""The frontier: factorization against, and stacked on, quantization (issue 15, part 5).

Users already ship quantized engines, so a factorized model only pays if it beats the original at
the *same* precision. For each model this script builds the original and the compressed models
(training-free variants, optionally recovered by distillation) at every precision, measures all engines of one precision in ONE alternating ``factorlm.benchmark``
run (paired rounds, bootstrap intervals), scores every engine's quality, and plots quality vs
speed with one marker per engine (colour = precision).

- all-MiniLM-L6-v2: fp32, int8 dynamic, int8 static (QDQ, calibrated on the compression's 256
  calibration reviews); whiten 0.6 and 0.5 (joint Q/K/V, default rank multiple). Quality = the
  quality table's probe: logistic regression trained on the fp32 original engine's mean-pooled
  embeddings of held-out reviews, scored on a disjoint part, accuracy drop vs the fp32 original
  with a paired bootstrap 95 % interval. Latency at 1x128 and 8x128 (random tokens).
- SmolLM2-135M-Instruct (exported with its KV cache): fp32, int8 dynamic, int8 static
  (calibrated on Emma chunks), int4 (MatMulNBits, block 32); the best training-free recipe,
  whiten + loss-aware allocation (lm output Fisher on the calibration chunks) at 0.8, with the
  tied embedding / LM head dense (``loss-aware-0.8``) or factorized at ``--embeddings 0.8``
  (``loss-aware-0.8+head0.8``: 107.2M parameters, the same as loss-aware 0.75 with a dense head,
  at the same training-free perplexity, 31.3 vs 31.2); separate Q/K/V and rank multiple 32 (factor shapes fit the int4
  block). Quality = perplexity on the first 8 windows of 512 tokens of Pride and Prejudice (as
  in the quality table) and free-running greedy agreement over 32 new tokens from the eight
  prompts of ``results/decode/prompts.jsonl`` (same novel), against the fp32 original and the
  original of the same precision. Latency: one decode step at past 512, batch 1 (tokens/s) and
  a prefill of 128 tokens.

Every engine is built with ``factorlm.build`` (ORT transformer optimizer on). In a quantized run
the fp32 original joins as an anchor, so each engine's speed is also given against fp32 paired
within its own run; comparisons across precisions divide two such anchored ratios (different
runs: no joint interval). One intra-op thread per session.

Outputs (``--out``, default ``benchmarks/results/frontier/``): ``frontier.json`` (one section per
model, updated in place), ``frontier.md``, ``frontier-<model>.png`` and the per-precision bench
reports under ``reports/``. Models, engines, quality scores and finished runs are cached in
``--work``; ``--resume`` reuses them. ``--skip-latency`` does everything but the latency runs
(and writes no results, only ``<work>/<model>/quality.md``), so the slow CPU work can run on a
busy machine and a later ``--resume`` run on a quiet one only measures latency (the calibration
statistics are computed only when a model is missing).

Usage: ``OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/frontier.py [--model minilm|smollm|all]
[--quick] [--iterations 30] [--recover-minutes 0] [--precisions fp32 int4 ...]
[--variants LABEL ...] [--skip-latency] [--work DIR] [--resume] [--out DIR]``.
Expected on the 2-core machine (estimates from quality.py's timings): MiniLM 5-10 min, SmolLM2
25-40 min (12 engine builds of a 540 MB model, 12 perplexities, 4 runs); ``--recover-minutes 15``
adds about 35 min per model (two distillations plus their engines). ``--quick`` on MiniLM: 2 min.
Work space: about 5 GB for SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from _common import uptime

__all__ = ["PRECISIONS", "main"]

logger = logging.getLogger("frontier")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "frontier"

#: ``factorlm.build`` options of every precision (transformer optimizer on for all).
PRECISIONS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "int8-dynamic": {"int8": True, "int8_mode": "dynamic"},
    "int8-static": {"int8": True, "int8_mode": "static"},
    "int4": {"int4": True, "int4_block_size": 32, "int4_accuracy_level": 4},
}
COLOURS = {
    "fp32": "tab:blue",
    "int8-dynamic": "tab:orange",
    "int8-static": "tab:green",
    "int4": "tab:red",
}
MODELS: dict[str, dict[str, Any]] = {
    "minilm": {
        "name": "all-MiniLM-L6-v2",
        "precisions": ("fp32", "int8-dynamic", "int8-static"),
        "variants": {"whiten-0.6": {"ratio": 0.6}, "whiten-0.5": {"ratio": 0.5}},
        "quick_variants": ("whiten-0.5",),
        "recovered": ("whiten-0.6", "whiten-0.5"),
        "rank_multiple": None,  # the quality table's default
        "joint_qkv": True,  # keeps ORT's fused Attention
        "speed": "1x128",
        "speeds": ("1x128", "8x128"),
    },
    "smollm": {
        "name": "SmolLM2-135M-Instruct",
        "precisions": ("fp32", "int8-dynamic", "int8-static", "int4"),
        # the best training-free recipe (issue 16): whiten + loss-aware allocation (lm Fisher on
        # the calibration chunks); "+head" also factorizes the tied embedding / LM head
        "variants": {
            "loss-aware-0.8": {"ratio": 0.8, "loss_aware": True},
            "loss-aware-0.8+head0.8": {"ratio": 0.8, "loss_aware": True, "embeddings": 0.8},
        },
        "quick_variants": ("loss-aware-0.8",),
        "recovered": ("loss-aware-0.8", "loss-aware-0.8+head0.8"),
        "rank_multiple": 32,  # = the int4 block size: every factor is quantizable
        "joint_qkv": False,  # quality.py: joint Q/K/V costs SmolLM2 perplexity
        "speed": "decode 1x1 past 512",
        "speeds": ("decode 1x1 past 512", "prefill 1x128"),
    },
}
#: Quality limits of the headline (issue 15's targets): MiniLM accuracy drop's upper 95 % bound
#: vs the fp32 original; SmolLM2 perplexity increase vs the fp32 original.
MINILM_MAX_DROP = 1.0
SMOLLM_MAX_INCREASE = 15.0

# Data layout, as in benchmarks/quality.py.
MINILM_CALIB_ROWS = 256
MINILM_PROBE_TRAIN = 2000
MINILM_EVAL = 1000
MINILM_SEQ = 128
SMOLLM_CALIB_CHUNKS = 32
SMOLLM_CALIB_TOKENS = 256
SMOLLM_STATIC_SAMPLES = 16  # static int8 calibration keeps every activation of a batch: small
SMOLLM_STATIC_TOKENS = 128
SMOLLM_WINDOW = 512
SMOLLM_WINDOWS = 8
SMOLLM_HELDOUT = "prideprejudice"
#: Greedy generation (issue 15's agreement target): new tokens from each prompt of
#: ``results/decode/prompts.jsonl`` (the first eight long paragraphs of Pride and Prejudice).
GREEDY_TOKENS = 32
PROMPTS = HERE / "results" / "decode" / "prompts.jsonl"


def say(message: str) -> None:
    """One timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Cache in --work


class Cache:
    """JSON records of finished steps in ``work/<model>/done.json`` (used with ``--resume``)."""

    def __init__(self, folder: Path, resume: bool) -> None:
        self.path = folder / "done.json"
        self.data: dict[str, Any] = {}
        if resume and self.path.is_file():
            self.data = json.loads(self.path.read_text())
        elif self.path.is_file():
            self.path.unlink()

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


# --------------------------------------------------------------------------------------------
# Models: compress, recover, build


class Lazy:
    """A value computed on first use: with ``--resume`` the calibration statistics (a few CPU
    minutes for the loss-aware Fisher) are only needed when a model is not cached yet."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._value: Any = None
        self._made = False

    def __call__(self) -> Any:
        if not self._made:
            self._value, self._made = self._make(), True
        return self._value


def compress_variant(
    spec: dict[str, Any], source: Path, work: Path, label: str, stats: Lazy, cache: Cache,
    *, joint_qkv: bool | None = None,
) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """``factorlm.compress`` whiten with variant ``label``'s options; its ONNX path and record.

    A variant's options: ``ratio``, optionally ``loss_aware`` (rank allocation and factors
    weighted by the output Fisher) and ``embeddings`` (the token embedding's ratio; a tied LM head
    shares its factors).
    """
    import factorlm

    opts = spec["variants"][label]
    joint = spec["joint_qkv"] if joint_qkv is None else joint_qkv
    name = label + ("" if joint == spec["joint_qkv"] else "-separate")
    out = work / "models" / name / "model.onnx"
    done = cache.get(f"compress/{name}")
    if done is not None and out.is_file():
        return out, done
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    extra = {"rank_multiple": spec["rank_multiple"]} if spec["rank_multiple"] else {}
    loss_aware = bool(opts.get("loss_aware", False))
    result = factorlm.compress(
        source, out, stats=stats(), method="whiten", ratio=opts["ratio"], joint_qkv=joint,
        loss_aware=loss_aware, embeddings=opts.get("embeddings"), **extra,
    )  # fmt: skip
    embedding_ranks = {n: e.rank for n, e in result.plan.weights.items() if e.kind == "embedding"}
    info = {
        "method": "whiten",
        "ratio": opts["ratio"],
        "loss_aware": loss_aware,
        "embeddings": opts.get("embeddings"),
        "embedding_rank": next(iter(embedding_ranks.values()), None),
        "joint_qkv": joint,
        "rank_multiple": spec["rank_multiple"] or "default",
        "factorized": result.factorized,
        "left_dense": result.skipped,
        "linear_kept": result.params_after / max(result.params_before, 1),
        "model_params_kept": result.model_params_after / max(result.model_params_before, 1),
        "compress_s": round(time.perf_counter() - start, 1),
    }
    cache.put(f"compress/{name}", info)
    say(f"{spec['name']} {name}: {result.factorized} weights factorized in {info['compress_s']} s")
    return out, info


def recover_variant(
    spec: dict[str, Any], source: Path, work: Path, base: str, stats: Lazy, cache: Cache,
    args: argparse.Namespace, *, hf_dir: Path, texts: Lazy, settings: dict[str, Any],
) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """Distil variant ``base``'s plan for ``--recover-minutes``; ONNX path + record.

    The plan's factors are recomputed by ``recover`` from the same statistics (loss-aware ones
    included), so the student starts as the training-free model; a factorized tied embedding /
    LM head is distilled with its shared factors.
    """
    import factorlm
    from factorlm.errors import ConfigError

    label = f"{base}+distill"
    out = work / "models" / label
    done = cache.get(f"recover/{label}")
    if done is not None and (out / "model.onnx").is_file():
        return out / "model.onnx", done
    model, info = compress_variant(spec, source, work, base, stats, cache)
    common = {
        "data": list(texts()), "onnx_model": source, "stats": stats(), "overwrite": True,
        "progress": False, "time_budget_s": args.recover_minutes * 60.0, "seed": 0, **settings,
    }  # fmt: skip
    say(f"{spec['name']} {label}: distilling for {args.recover_minutes} CPU minutes")
    start = time.perf_counter()
    try:
        result = factorlm.recover(hf_dir, model.with_name("model.plan.json"), out, **common)
    except ConfigError as exc:  # recovery does not take joint Q/K/V plans: plan them apart
        if "jointly" not in str(exc):
            raise
        model, info = compress_variant(spec, source, work, base, stats, cache, joint_qkv=False)
        result = factorlm.recover(hf_dir, model.with_name("model.plan.json"), out, **common)
    record = {
        **info,
        "recovered": True,
        "recovery": {
            "settings": dict(settings), "minutes": args.recover_minutes, "steps": result.steps_done,
            "stopped": result.stopped, "train_cpu_s": round(result.train_cpu_seconds, 1),
            "wall_s": round(time.perf_counter() - start, 1), "texts": len(texts()),
        },
    }  # fmt: skip
    cache.put(f"recover/{label}", record)
    return result.model, record


def build_engine(
    source: Path, model: Path, folder: Path, precision: str, cache: Cache, *,
    calibration: Sequence[str], calibration_length: int,
) -> dict[str, Any]:  # fmt: skip
    """``factorlm.build`` at ``precision``; the engine folder and its quantization coverage."""
    import factorlm
    from factorlm.exporters.ort import EngineManifest

    key = f"build/{folder.parent.name}/{folder.name}"
    if cache.get(key) is not None and (folder / "manifest.json").is_file():
        return dict(cache.get(key))
    options = dict(PRECISIONS[precision])
    data = None
    if options.get("int8_mode") == "static":
        data = list(calibration)
        options.update(calibration_samples=len(data), max_length=calibration_length)
    say(f"building {folder.parent.name} {folder.name}")
    start = time.perf_counter()
    manifest: EngineManifest = factorlm.build(
        model, folder, optimize=True, reference=source, data=data, tokenizer=source.parent,
        overwrite=True, **options,
    )  # fmt: skip
    quant = manifest.quantization or {}
    info = {
        "folder": str(folder),
        "build_s": round(time.perf_counter() - start, 1),
        "fusions": {k: v for k, v in manifest.fusions.get("engine", {}).items() if v},
        "quantized": (
            f"{quant.get('quantized')}/{quant.get('weights')} linear weights "
            f"(factors {quant.get('factor_quantized')}/{quant.get('factor_weights')})"
            if quant else "-"
        ),
    }  # fmt: skip
    cache.put(key, info)
    return info


# --------------------------------------------------------------------------------------------
# Quality


def reviews() -> list[dict[str, Any]]:
    from factorlm.assets import reviews_path
    from factorlm.data import iter_records

    return list(iter_records(reviews_path()))


def minilm_split(rows: list[dict[str, Any]], quick: bool) -> dict[str, Any]:
    """quality.py's split: calibration rows, then probe-train and evaluation fresh/rotten rows."""
    polar = [(i, r) for i, r in enumerate(rows) if r.get("label") in ("fresh", "rotten")]
    held = [(i, r) for i, r in polar if i >= MINILM_CALIB_ROWS]
    n_train, n_eval = (400, 200) if quick else (MINILM_PROBE_TRAIN, MINILM_EVAL)
    train, evaluation = held[:n_train], held[n_train : n_train + n_eval]
    return {"train": train, "eval": evaluation, "after": evaluation[-1][0] + 1}


class MinilmQuality:
    """The quality table's probe: trained once on the fp32 original engine's embeddings."""

    def __init__(self, source: Path, split: dict[str, Any]) -> None:
        from factorlm._common.text import TextTokenizer, find_tokenizer

        self.tokenizer = TextTokenizer(find_tokenizer(source.parent))
        # sorted by length so batches carry little padding; labels follow
        train = sorted(split["train"], key=lambda item: len(item[1]["text"]))
        evaluation = sorted(split["eval"], key=lambda item: len(item[1]["text"]))
        self.train_texts = [str(r["text"]) for _, r in train]
        self.eval_texts = [str(r["text"]) for _, r in evaluation]
        self.train_y = np.asarray([r["label"] for _, r in train])
        self.eval_y = np.asarray([r["label"] for _, r in evaluation])
        self.probe: Any = None
        self.reference: dict[str, np.ndarray] = {}  # precision -> correctness of its original
        self.fp32_pred: np.ndarray | None = None

    def embed(self, engine: Path, texts: Sequence[str]) -> np.ndarray:
        from factorlm.bench.runners import load_runner
        from factorlm.bench.tasks import embed_texts

        with load_runner(engine, graph_optimization_level="all") as runner:
            vectors, _ = embed_texts(
                [runner], self.tokenizer, texts, batch_size=32, max_length=MINILM_SEQ
            )
        return vectors[0]

    def fit(self, fp32_original: Path) -> None:
        from sklearn.linear_model import LogisticRegression

        self.probe = LogisticRegression(max_iter=2000).fit(
            self.embed(fp32_original, self.train_texts), self.train_y
        )

    def score(self, engine: Path) -> dict[str, Any]:
        """Accuracy and the raw per-row correctness (for paired intervals later)."""
        pred = self.probe.predict(self.embed(engine, self.eval_texts))
        correct = pred == self.eval_y
        return {"accuracy": float(correct.mean()) * 100, "correct": correct.astype(int).tolist(),
                "pred": pred.tolist()}  # fmt: skip


def austen_ids(tokenizer: Any, novel: str) -> np.ndarray:
    from factorlm.assets import austen_dir

    text = (austen_dir() / f"{novel}.txt").read_text(encoding="utf-8")
    return np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)


def smollm_statistics(source: Path, hf_dir: Path, chunks: Sequence[str], loss_aware: bool) -> Any:
    """The quality table's calibration (Emma chunks), plus the lm output Fisher for loss-aware."""
    from factorlm.calibration import collect_output_fisher, collect_statistics

    say("SmolLM2: calibration statistics" + (" and output Fisher" if loss_aware else ""))
    stats = collect_statistics(
        source, chunks, max_samples=SMOLLM_CALIB_CHUNKS, max_length=SMOLLM_CALIB_TOKENS,
        batch_size=4, progress=False,
    )  # fmt: skip
    if loss_aware:
        stats.output_fisher = collect_output_fisher(
            hf_dir, source, chunks, task="lm", max_samples=SMOLLM_CALIB_CHUNKS,
            max_length=SMOLLM_CALIB_TOKENS, batch_size=4, progress=False,
        )  # fmt: skip
    return stats


def generation_prompts(tokenizer: Any) -> list[list[int]]:
    """Token ids of the generation prompts (the decode benchmark's, held-out novel)."""
    from factorlm.data import iter_records

    return [list(tokenizer(str(r["text"]))["input_ids"]) for r in iter_records(PROMPTS)]


def greedy_tokens(
    engine: Path, prompts: Sequence[Sequence[int]], new_tokens: int
) -> list[list[int]]:
    """Each prompt's ``new_tokens`` greedy tokens (KV cache carried, EOS ignored)."""
    from factorlm.bench.decode import greedy_generate
    from factorlm.bench.generation import require_decoder
    from factorlm.bench.runners import load_runner

    with load_runner(engine, graph_optimization_level="all") as runner:
        layout = require_decoder(runner)
        return [greedy_generate(runner, layout, p, new_tokens).tokens for p in prompts]


def agreement(
    reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Free-running greedy agreement: the share of positions with the same token (%), and the
    mean index of the first differing token (``GREEDY_TOKENS`` when all agree)."""
    same, first = [], []
    for ref, cand in zip(reference, candidate, strict=True):
        equal = [a == b for a, b in zip(ref, cand, strict=True)]
        same += equal
        first.append(equal.index(False) if False in equal else len(equal))
    return {"percent": float(np.mean(same)) * 100, "first_divergence": float(np.mean(first))}


def perplexity(engine: Path, ids: np.ndarray, windows: int) -> float:
    from factorlm.bench.runners import load_runner
    from factorlm.bench.tasks import window_nll

    with load_runner(engine, graph_optimization_level="all") as runner:
        nll, scored, _ = window_nll(runner, ids, window=SMOLLM_WINDOW, max_windows=windows)
    return float(np.exp(nll / scored))


# --------------------------------------------------------------------------------------------
# One alternating run per precision


def latency_run(
    model: str, precision: str, engines: dict[str, Path], fp32_original: Path,
    args: argparse.Namespace, out: Path, cache: Cache,
) -> dict[str, Any]:  # fmt: skip
    """All engines of ``precision`` (+ the fp32 original as an anchor) in one ``factorlm.benchmark``.

    Returns ``{shape: {engine: {"p50_ms", "tokens_per_s", "samples_ms", "vs_same": interval}}}``.
    """
    import factorlm
    from factorlm.options import BenchOptions

    key = f"latency/{precision}"
    if cache.get(key) is not None:
        return dict(cache.get(key))
    names = list(engines)
    candidates: list[tuple[str, Path]] = [(n, engines[n]) for n in names[1:]]
    if precision != "fp32":
        candidates.append(("original-fp32", fp32_original))
    shape_opts: dict[str, Any] = (
        {"shapes": ("1x128", "8x128")} if model == "minilm"
        else {"prefill_lengths": (128,), "decode_past": (512,), "decode_batches": (1,)}
    )  # fmt: skip
    options = BenchOptions(
        task="none", threads=1, warmup=args.warmup, iterations=args.iterations, seed=0, **shape_opts
    )
    say(f"{MODELS[model]['name']} {precision}: alternating {len(candidates) + 1} engines, "
        f"{args.iterations} rounds per point")  # fmt: skip
    # a reference is a path or NAME=PATH (candidates may be (name, path) pairs)
    report = factorlm.benchmark(f"{names[0]}={engines[names[0]]}", candidates, options)
    report.write(out / "reports" / f"{model}-{precision}", html_report=False)
    result: dict[str, Any] = {}
    for entry in report.data["latency"]:
        shape: dict[str, Any] = {}
        for name, res in entry["results"].items():
            shape[name] = {
                "p50_ms": res["p50_ms"],
                "tokens_per_s": res.get("tokens_per_s"),
                "samples_ms": res["samples_ms"],
                "vs_same": entry["speedup"].get(name),
            }
        result[entry["shape"]] = shape
    result["_engines"] = report.data.get("engines", {})
    cache.put(key, result)
    return result


def paired(
    reference_ms: Sequence[float], candidate_ms: Sequence[float], seed: int = 1
) -> dict[str, float]:
    """Median per-round speedup reference/candidate with its 95 % bootstrap interval."""
    from factorlm.bench.latency import speedup_interval

    iv = speedup_interval(
        np.asarray(reference_ms), np.asarray(candidate_ms), rng=np.random.default_rng(seed)
    )
    return {"estimate": iv.estimate, "ci_low": iv.low, "ci_high": iv.high}


# --------------------------------------------------------------------------------------------
# The run of one model


def selected_variants(spec: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The compressed variants of this run: ``--variants`` (those of this model), else all
    (``--quick``: the quick ones)."""
    if args.variants:
        return [v for v in spec["variants"] if v in args.variants]
    return list(spec["quick_variants"] if args.quick else spec["variants"])


def run_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    from factorlm.assets import minilm_dir, smollm_dir
    from factorlm.calibration import collect_statistics

    spec = MODELS[model]
    load_before = uptime()
    started = time.perf_counter()
    work = args.work / model
    work.mkdir(parents=True, exist_ok=True)
    cache = Cache(work, args.resume)
    chosen = selected_variants(spec, args)
    precisions = [p for p in spec["precisions"] if args.precisions is None or p in args.precisions]

    # sources, calibration texts, quality scorer, recovery texts
    scorer: Any = None  # MiniLM's probe
    held_ids, windows = np.empty(0, dtype=np.int64), SMOLLM_WINDOWS  # SmolLM2's perplexity
    if model == "minilm":
        from factorlm.assets import exported_minilm
        from quality import MINILM_RECOVERY

        source = exported_minilm()
        rows = reviews()
        texts = [str(r["text"]) for r in rows[:MINILM_CALIB_ROWS]]
        calibration = texts[:32] if args.quick else texts  # static int8's calibration
        calib_length = MINILM_SEQ
        split = minilm_split(rows, args.quick)
        scorer = MinilmQuality(source, split)
        hf_dir = minilm_dir()
        stats = Lazy(
            lambda: collect_statistics(source, texts, max_samples=MINILM_CALIB_ROWS, progress=False)
        )
        distill = Lazy(
            lambda: [
                str(r["text"]) for r in rows[split["after"] :] if str(r.get("text", "")).strip()
            ]
        )
        settings = dict(MINILM_RECOVERY)
        data_note = (
            f"reviews rows 0-{MINILM_CALIB_ROWS} calibrate (compression and static int8"
            f"{', 32 for static int8 in --quick' if args.quick else ''}); probe trained on "
            f"{len(split['train'])} and scored on {len(split['eval'])} later fresh/rotten rows"
        )
    else:
        from transformers import AutoTokenizer

        from quality import SMOLLM_RECOVERY, exported_smollm, smollm_distill_texts

        source = exported_smollm()
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent))
        emma = austen_ids(tokenizer, "emma")
        chunks = [
            tokenizer.decode(emma[i * SMOLLM_CALIB_TOKENS : (i + 1) * SMOLLM_CALIB_TOKENS])
            for i in range(SMOLLM_CALIB_CHUNKS)
        ]
        calibration = chunks[: 4 if args.quick else SMOLLM_STATIC_SAMPLES]
        calib_length = SMOLLM_STATIC_TOKENS
        held_ids = austen_ids(tokenizer, SMOLLM_HELDOUT)
        windows = 2 if args.quick else SMOLLM_WINDOWS
        hf_dir = smollm_dir()
        loss_aware = any(spec["variants"][v].get("loss_aware") for v in chosen)
        stats = Lazy(lambda: smollm_statistics(source, hf_dir, chunks, loss_aware))
        settings = dict(SMOLLM_RECOVERY)
        distill = Lazy(lambda: smollm_distill_texts(tokenizer, int(settings["max_length"]))[0])
        prompts = generation_prompts(tokenizer)
        data_note = (
            f"compression calibrated on {SMOLLM_CALIB_CHUNKS} chunks of {SMOLLM_CALIB_TOKENS} tokens "
            f"of Emma; static int8 on the first {len(calibration)} of them cut to {calib_length} "
            f"tokens; perplexity on the first {windows} windows of {SMOLLM_WINDOW} tokens of "
            "Pride and Prejudice"
        )
    if args.recover_steps:
        settings["steps"] = args.recover_steps
    # the model variants: original, training-free, recovered
    variants: dict[str, Path] = {"original": source}
    records: dict[str, dict[str, Any]] = {"original": {"method": "original"}}
    recovered = [
        v
        for v in chosen
        if args.recover_minutes > 0
        and v in (spec["recovered"] if args.recover_variants is None else args.recover_variants)
    ]
    for label in chosen:
        path, info = compress_variant(spec, source, work, label, stats, cache)
        if not (args.recovered_only and label in recovered):
            variants[label], records[label] = path, info
    if recovered:
        for label in recovered:
            path, info = recover_variant(
                spec, source, work, label, stats, cache, args, hf_dir=hf_dir, texts=distill,
                settings=settings,
            )  # fmt: skip
            variants[f"{label}+distill"], records[f"{label}+distill"] = path, info

    def score(folder: Path, fp32_original: Path) -> dict[str, Any]:
        if model == "minilm":
            if scorer.probe is None:
                scorer.fit(fp32_original)
            return dict(scorer.score(folder))
        return {
            "perplexity": perplexity(folder, held_ids, windows),
            "greedy": greedy_tokens(folder, prompts, GREEDY_TOKENS),
        }

    # engines, quality, one latency run per precision; a failed engine (or precision) is recorded
    # and the run goes on (the fp32 original is needed by everything: its failure stops the run)
    engines: dict[str, dict[str, Path]] = {}
    points: list[dict[str, Any]] = []
    errors: list[str] = []
    for precision in precisions:
        engines[precision] = {}
        for label, onnx_path in variants.items():
            if label != "original" and "original" not in engines[precision]:
                continue  # no reference at this precision
            try:
                point = engine_point(
                    model, precision, label, source, onnx_path, work, cache, records[label],
                    calibration=calibration, calibration_length=calib_length,
                    score=lambda folder: score(folder, work / "engines" / "fp32" / "original"),
                )  # fmt: skip
            except Exception as exc:
                if precision == "fp32" and label == "original":
                    raise
                logger.exception("%s %s failed", precision, label)
                errors.append(f"{precision} {label}: {type(exc).__name__}: {exc}")
                continue
            engines[precision][label] = Path(point["folder"])
            points.append(point)
    if args.skip_latency:
        add_quality_deltas(model, points)
        return {"model": spec["name"], "points": points, "errors": errors, "skipped_latency": True}
    for precision in precisions:
        if len(engines[precision]) < 2:
            if precision == "fp32":
                raise SystemExit(f"{spec['name']}: no compressed fp32 engine to measure: {errors}")
            errors.append(f"{precision}: no latency run (no engine pair at this precision)")
            points = [p for p in points if p["precision"] != precision]
            continue
        try:
            latency = latency_run(
                model, precision, engines[precision], engines["fp32"]["original"], args, args.out, cache
            )  # fmt: skip
        except Exception as exc:
            if precision == "fp32":
                raise
            logger.exception("latency run %s failed", precision)
            errors.append(f"{precision} latency run: {type(exc).__name__}: {exc}")
            points = [p for p in points if p["precision"] != precision]
            continue
        for point in (p for p in points if p["precision"] == precision):
            add_latency(point, latency, spec["speeds"])
    add_quality_deltas(model, points)
    return {
        "model": spec["name"],
        "source": str(source),
        "variants": {label: spec["variants"][label] for label in chosen},
        "recover_minutes": args.recover_minutes,
        "recovered_only": args.recovered_only,
        "precisions": list(precisions),
        "data": data_note,
        "latency_protocol": (
            f"one factorlm.benchmark run per precision: every engine of that precision plus the fp32 "
            f"original (anchor) alternated in random order each round, {args.warmup} warm-up + "
            f"{args.iterations} timed rounds per point, 1 intra-op thread, ORT_ENABLE_ALL, random "
            f"tokens; points {', '.join(spec['speeds'])}; speedups = median per-round ratio, 95 % "
            "bootstrap interval"
        ),
        "points": points,
        "errors": errors,
        "load_before": load_before,
        "load_after": uptime(),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def engine_point(
    model: str, precision: str, label: str, source: Path, onnx_path: Path, work: Path,
    cache: Cache, record: dict[str, Any], *, calibration: Sequence[str], calibration_length: int,
    score: Callable[[Path], dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """Build one engine and score its quality (both cached in ``--work``)."""
    name = f"{MODELS[model]['name']} {precision} {label}"
    folder = work / "engines" / precision / label
    info = build_engine(
        source, onnx_path, folder, precision, cache,
        calibration=calibration, calibration_length=calibration_length,
    )  # fmt: skip
    key = f"quality/{precision}/{label}"
    scored = cache.get(key)
    if scored is None:
        scored = score(folder)
        cache.put(key, scored)
    quality = (f"accuracy {scored['accuracy']:.2f} %" if model == "minilm"
               else f"perplexity {scored['perplexity']:.3f}")  # fmt: skip
    say(f"{name}: built in {info['build_s']} s, {quality}")
    return {"engine": f"{precision} {label}", "precision": precision, "variant": label,
            **record, **info, **scored}  # fmt: skip


def add_latency(point: dict[str, Any], latency: dict[str, Any], speeds: Sequence[str]) -> None:
    """The engine's numbers from its precision's run: vs that precision's original and vs fp32."""
    anchor = "original" if point["precision"] == "fp32" else "original-fp32"
    size = latency["_engines"].get(point["variant"], {}).get("size_bytes") or 0
    point["disk_mb"] = size / 1e6
    point["latency"] = {}
    for shape in speeds:
        row = latency[shape]
        mine = row[point["variant"]]
        point["latency"][shape] = {
            "p50_ms": mine["p50_ms"],
            "tokens_per_s": mine["tokens_per_s"],
            "vs_same": mine["vs_same"] or {"estimate": 1.0, "ci_low": 1.0, "ci_high": 1.0},
            "vs_fp32": paired(row[anchor]["samples_ms"], mine["samples_ms"]),
        }


def add_quality_deltas(model: str, points: list[dict[str, Any]]) -> None:
    """Quality vs the fp32 original and vs the original of the same precision (paired for MiniLM)."""
    from factorlm.bench.accuracy import paired_bootstrap_drop

    originals = {p["precision"]: p for p in points if p["variant"] == "original"}
    fp32 = originals["fp32"]
    for p in points:
        for tag, ref in (("fp32", fp32), ("same", originals[p["precision"]])):
            if model == "minilm":
                ref_c, cand_c = np.asarray(ref["correct"]), np.asarray(p["correct"])
                low, high = paired_bootstrap_drop(ref_c, cand_c, seed=0)
                p[f"drop_vs_{tag}"] = {
                    "estimate": ref["accuracy"] - p["accuracy"],
                    "ci_low": low,
                    "ci_high": high,
                }
            else:
                p[f"increase_vs_{tag}"] = (p["perplexity"] / ref["perplexity"] - 1.0) * 100.0
                if "greedy" in p and "greedy" in ref:
                    p[f"greedy_vs_{tag}"] = agreement(ref["greedy"], p["greedy"])
        if model == "minilm":
            p["agreement_vs_fp32"] = (
                float(np.mean(np.asarray(p["pred"]) == np.asarray(fp32["pred"]))) * 100
            )
    for p in points:  # the per-row arrays served the intervals; keep the JSON small
        p.pop("correct", None)
        p.pop("pred", None)
        p.pop("greedy", None)


# --------------------------------------------------------------------------------------------
# Reporting


def acceptable(model: str, point: dict[str, Any]) -> bool:
    if model == "minilm":
        return bool(point["drop_vs_fp32"]["ci_high"] <= MINILM_MAX_DROP)
    return bool(point["increase_vs_fp32"] <= SMOLLM_MAX_INCREASE)


def headline(model: str, section: dict[str, Any]) -> str:
    """The best compressed point against the best quantized original (fastest within the limit)."""
    speed = MODELS[model]["speed"]
    limit = (f"accuracy drop's upper 95 % bound <= {MINILM_MAX_DROP} point" if model == "minilm"
             else f"perplexity <= +{SMOLLM_MAX_INCREASE:.0f} % of the fp32 original")  # fmt: skip
    pts = section["points"]

    def fastest(items: list[dict[str, Any]]) -> dict[str, Any] | None:
        return max(items, key=lambda p: p["latency"][speed]["vs_fp32"]["estimate"], default=None)

    comp = [p for p in pts if p["variant"] != "original"]
    quant = [p for p in pts if p["variant"] == "original" and p["precision"] != "fp32"]
    best_c = fastest([p for p in comp if acceptable(model, p)])
    best_q = fastest([p for p in quant if acceptable(model, p)])
    note_c = note_q = ""
    if best_c is None:
        best_c, note_c = fastest(comp), " (none within the limit: fastest shown)"
    if best_q is None:
        best_q, note_q = fastest(quant), " (none within the limit: fastest shown)"
    if best_c is None or best_q is None:
        return "Best compressed vs best quantized original: no points."
    sc, sq = best_c["latency"][speed], best_q["latency"][speed]
    if best_c["precision"] == best_q["precision"]:
        ratio = sc["vs_same"]
        vs = f"{ratio['estimate']:.2f}x [{ratio['ci_low']:.2f}, {ratio['ci_high']:.2f}] (paired, same run)"
    else:
        vs = (f"{sc['vs_fp32']['estimate'] / sq['vs_fp32']['estimate']:.2f}x (ratio of the two "
              "runs' speedups over the fp32 original; different runs, no joint interval)")  # fmt: skip
    return (
        f"**Best compressed point: {best_c['engine']}{note_c}, {fmt_quality(model, best_c)}, "
        f"{sc['vs_fp32']['estimate']:.2f}x the fp32 original at {speed}; best quantized original: "
        f"{best_q['engine']}{note_q}, {fmt_quality(model, best_q)}, {sq['vs_fp32']['estimate']:.2f}x. "
        f"Compressed vs quantized original: {vs}.** (limit: {limit})"
    )


def fmt_quality(model: str, p: dict[str, Any]) -> str:
    if model == "minilm":
        d = p["drop_vs_fp32"]
        return f"accuracy {p['accuracy']:.2f} % (drop {d['estimate']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}])"
    return f"perplexity {p['perplexity']:.2f} ({p['increase_vs_fp32']:+.1f} %)"


def quality_summary(model: str, section: dict[str, Any]) -> str:
    """The engines' quality before any latency run (``--skip-latency``), as a markdown table."""
    lines = ["| engine | quality | vs same-precision original | greedy agreement vs fp32 / same |",
             "|---|---|---|---|"]  # fmt: skip
    for p in section["points"]:
        if model == "minilm":
            vs_same = f"{p['drop_vs_same']['estimate']:+.2f} pts"
        else:
            vs_same = f"{p['increase_vs_same']:+.1f} %"
        greedy = " / ".join(
            f"{p[k]['percent']:.1f} %" for k in ("greedy_vs_fp32", "greedy_vs_same") if k in p
        )
        lines.append(f"| {p['engine']} | {fmt_quality(model, p)} | {vs_same} | {greedy or '-'} |")
    return "\n".join(lines) + "\n"


def _iv(iv: dict[str, float], digits: int = 2) -> str:
    return f"{iv['estimate']:.{digits}f}x [{iv['ci_low']:.{digits}f}, {iv['ci_high']:.{digits}f}]"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# The frontier: factorization against and stacked on quantization",
        "",
        "Produced by `benchmarks/frontier.py` from `frontier.json` next to this file. Every precision",
        "is one alternating run (all engines of that precision + the fp32 original as an anchor),",
        "so `vs same precision` is paired within a run; `vs fp32` is paired too (the anchor ran in",
        "the same rounds). Rows `+distill` are recovered by distillation, the others training-free.",
        "",
    ]
    for model, section in results.items():
        if model not in MODELS:
            continue
        spec = MODELS[model]
        env = section["environment"]
        lines += [
            f"## {section['model']}",
            "",
            f"Command: `{section['command']}` ({section['wall_s'] / 60:.1f} min{', QUICK smoke run' if section.get('quick') else ''}).  ",
            f"Machine: {env['cpu']} (/proc/cpuinfo), {env['cpu_count']} cores ({env['affinity']} usable), {env['platform']}, Python {env['python']}.  ",
            f"Libraries: {', '.join(f'{k} {v}' for k, v in env['libraries'].items())}.  ",
            f"Load before: `{section['load_before']}`  ",
            f"Load after: `{section['load_after']}`  ",
            f"Data: {section['data']}.  ",
            f"Latency: {section['latency_protocol']}.",
            "",
            headline(model, section),
            "",
            *(f"- Failed: {e}" for e in section.get("errors", [])),
            *([""] if section.get("errors") else []),
        ]
        s1, s2 = spec["speeds"]
        if model == "minilm":
            head = ["precision", "engine", "probe acc %", "drop vs fp32 orig (pts) [95% CI]",
                    "drop vs same-precision orig", "agree w/ fp32 %"]  # fmt: skip
        else:
            head = [
                "precision",
                "engine",
                "perplexity",
                "vs fp32 orig %",
                "vs same-precision orig %",
                f"greedy agree % ({GREEDY_TOKENS} tok) vs fp32 / same",
            ]
        unit = "tok/s" if model == "smollm" else "p50 ms"
        head += [f"{s1} {unit}", f"{s1} vs same precision [95% CI]", f"{s1} vs fp32 [95% CI]",
                 f"{s2} vs same precision", "disk MB", "quantized", "factorized / dense"]  # fmt: skip
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in section["points"]:
            lat1, lat2 = p["latency"][s1], p["latency"][s2]
            if model == "minilm":
                d, ds = p["drop_vs_fp32"], p["drop_vs_same"]
                cells = [f"{p['accuracy']:.2f}", f"{d['estimate']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]",
                         f"{ds['estimate']:+.2f} [{ds['ci_low']:+.2f}, {ds['ci_high']:+.2f}]",
                         f"{p['agreement_vs_fp32']:.1f}"]  # fmt: skip
                speed = f"{lat1['p50_ms']:.2f}"
            else:
                greedy = " / ".join(
                    f"{p[k]['percent']:.1f}" for k in ("greedy_vs_fp32", "greedy_vs_same") if k in p
                )
                cells = [
                    f"{p['perplexity']:.3f}",
                    f"{p['increase_vs_fp32']:+.1f}",
                    f"{p['increase_vs_same']:+.1f}",
                    greedy or "-",
                ]
                speed = f"{lat1['tokens_per_s']:.1f}" if lat1.get("tokens_per_s") else "-"
            fact = f"{p['factorized']} / {p['left_dense']}" if "factorized" in p else "-"
            lines.append("| " + " | ".join([
                p["precision"], p["variant"], *cells, speed, _iv(lat1["vs_same"]), _iv(lat1["vs_fp32"]),
                _iv(lat2["vs_same"]), f"{p.get('disk_mb', 0):.1f}", p["quantized"], fact,
            ]) + " |")  # fmt: skip
        lines += ["", f"![quality vs speed](frontier-{model}.png)", ""]
    return "\n".join(lines) + "\n"


def plot(model: str, section: dict[str, Any], path: Path) -> None:
    """Quality vs speed over the fp32 original: one marker per engine, colour per precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = MODELS[model]["speed"]
    key, ylabel = (("accuracy", "probe accuracy (%)") if model == "minilm"
                   else ("perplexity", "perplexity (Pride and Prejudice)"))  # fmt: skip
    markers = ["o", "s", "D", "^", "v", "P", "X", "*"]
    variants = list(dict.fromkeys(p["variant"] for p in section["points"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for p in section["points"]:
        iv = p["latency"][speed]["vs_fp32"]
        x, y = iv["estimate"], p[key]
        ax.errorbar([x], [y], xerr=[[x - iv["ci_low"]], [iv["ci_high"] - x]], fmt=markers[variants.index(p["variant"]) % len(markers)],
                    color=COLOURS[p["precision"]], markersize=7, capsize=2, linewidth=0.8)  # fmt: skip
        ax.annotate(
            p["variant"].replace("whiten-", "w"),
            (x, y),
            textcoords="offset points",
            xytext=(4, 3),
            fontsize=7,
        )
    for precision in section["precisions"]:
        ax.plot([], [], "s", color=COLOURS[precision], label=precision)
    for i, variant in enumerate(variants):
        ax.plot([], [], markers[i % len(markers)], color="grey", label=variant)
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(f"speedup vs fp32 original at {speed} (paired, same run; 95% CI)")
    ax.set_ylabel(ylabel)
    ax.set_title(
        f"{section['model']}: quality vs speed (colour: precision, marker: model)", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_results(out: Path, model: str, section: dict[str, Any]) -> None:
    """Replace one model's section of frontier.json (the other kept), then frontier.md and plots."""
    out.mkdir(parents=True, exist_ok=True)
    existing = out / "frontier.json"
    results = json.loads(existing.read_text()) if existing.is_file() else {}
    results[model] = section
    for name, path in (
        (out / "frontier.json", json.dumps(results, indent=2) + "\n"),
        (out / "frontier.md", markdown(results)),
    ):
        tmp = name.with_name(f".{name.name}.tmp")
        tmp.write_text(path)
        tmp.replace(name)
    plot(model, section, out / f"frontier-{model}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "smollm", "all"), default="all")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one ratio, fewer probe rows/windows, 5 rounds")  # fmt: skip
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="timed rounds per point (default 30; --quick 5)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up rounds per point (default 5; --quick 2)"
    )
    parser.add_argument("--recover-minutes", type=float, default=0.0,
                        help="also distil each training-free model for this many CPU minutes (0: none)")  # fmt: skip
    parser.add_argument("--recover-steps", type=int, default=None,
                        help="distillation steps (default: the quality table's recovery settings)")  # fmt: skip
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "factorlm-frontier"
    )
    parser.add_argument(
        "--resume", action="store_true", help="reuse models, engines, scores and runs in --work"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--precisions", nargs="+", choices=list(PRECISIONS), default=None,
        help="only these precisions (fp32 is the anchor of every run and always included)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", nargs="+", default=None,
        choices=sorted({v for spec in MODELS.values() for v in spec["variants"]}),
        help="only these compressed variants (with --recover-minutes, also their +distill rows)",
    )  # fmt: skip
    parser.add_argument(
        "--skip-latency", action="store_true",
        help="compress, recover, build and score only (no latency run, no results written); a "
        "later --resume run then only measures latency",
    )  # fmt: skip
    parser.add_argument(
        "--recover-variants", nargs="+", default=None,
        help="with --recover-minutes: recover only these variants (default: the model's list)",
    )  # fmt: skip
    parser.add_argument(
        "--recovered-only", action="store_true",
        help="with --recover-minutes: no training-free engine of a recovered variant (a "
        "recovered model has its training-free model's shapes, hence its speed)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.recovered_only and args.recover_minutes <= 0:
        parser.error("--recovered-only needs --recover-minutes > 0.")
    if args.precisions is not None and "fp32" not in args.precisions:
        args.precisions.append("fp32")
    args.iterations = args.iterations or (5 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from factorlm.bench.latency import environment_info

    command = "python benchmarks/frontier.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    todo = ["minilm", "smollm"] if args.model == "all" else [args.model]
    if not args.resume:
        for name in todo:
            shutil.rmtree(args.work / name, ignore_errors=True)
    for name in todo:
        section = run_model(name, args)
        if section.get("skipped_latency"):
            summary = quality_summary(name, section)
            (args.work / name / "quality.md").write_text(summary)
            say(f"{section['model']}: latency skipped; quality so far:\n{summary}")
            continue
        section.update(command=command.strip(), quick=args.quick, environment=environment_info())
        write_results(args.out, name, section)
        say(headline(name, section))
        say(f"{section['model']} done in {section['wall_s'] / 60:.1f} min; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
