"""Issue 16: training-free decoder quality of each calibration option, on SmolLM2-135M.

Every point is ``factorlm.compress(method="whiten", ratio=R, ...)`` on the exported
SmolLM2-135M-Instruct (text-generation-with-past) with one of the options below, scored by
perplexity (8 windows of 512 tokens, ORT, empty KV cache) on held-back text:

- test: *Pride and Prejudice* (the README's figure; never used for any choice);
- tune: *Persuasion* (where options were compared while building them).

Calibration (in-domain): the first 32 chunks of 256 tokens of *Emma*. Cross-domain: 32 chunks of
about 256 tokens of Rotten Tomatoes review snippets (joined in file order), evaluated on the same
Austen text. The output Fisher (``loss_aware``) comes from the same calibration texts, next-token
loss, through PyTorch.

Variants (``--variants``): ``whiten`` (today's default), ``loss_aware``, ``sequential``
(4 blocks, default ridge), ``sequential_no_ridge``, ``loss_aware+sequential``,
``shrinkage`` and ``loss_aware+shrinkage`` (Grams shrunk by held-back likelihood),
``loss_aware+blend`` (each Gram blended with its Gram on factorlm's mixed-genre set, the weight
chosen by the likelihood of the calibration data's held-back batches, and each output Fisher
with its generic one at its input Gram's weight), ``loss_aware+blend0.5`` / ``0.75`` / ``0.9``
/ ``1.0`` (fixed weights; 1.0 is the generic set's statistics alone), ``..._gram_only`` (the
Grams only: session 5's blend) and, exploration, ``loss_aware+blend+fisher1`` (Grams auto, the
output Fisher entirely the generic one). The ``loss_aware+blend_broad`` rows of the results
(session 6 exploration; the option was removed) chose the weight by the held-back batches of
both the calibration data and the generic set.

Domains (``--domains``): ``reviews128`` is four times as many review snippets (128 chunks), to
tell a narrow genre from a small set. Diagnostics of what the cross-domain target measures:
``persuasion`` (32 chunks of *Persuasion* from token 8,192: the test novel's author; its tune
column is the same novel, so not held back) and ``austen3`` (the mixed set's prose records
only: three other Austen novels, no reviews).

Times: ``calibrate_s`` is the cold cost of the statistics the variant needs (Gram, plus the
output Fisher for loss-aware), measured once into a fresh cache; ``compress_s`` is the
``compress`` call given those statistics (the sequential refit's paired passes are in it).
The blend variants add the cold cost of the generic Grams (``+ N generic``), collected once per
model like ``compress --blend`` does (``calibration.requested.generic_statistics``).

Usage: ``OPENBLAS_NUM_THREADS=1 python benchmarks/decoder_quality.py [--ratios 0.8 0.9]
[--variants whiten loss_aware ...] [--domains emma reviews] [--work DIR]`` after ``factorlm assets``.
Writes ``benchmarks/results/decoder_quality.{json,md}`` (points merged by key, so runs add up).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import environment_lines, uptime  # noqa: E402

RESULTS = HERE / "results" / "decoder_quality"
CHUNKS, CHUNK_TOKENS, WINDOW, WINDOWS = 32, 256, 512, 8
#: Where the ``persuasion`` calibration starts: past the tune windows (8 × 512 tokens), twice.
PERSUASION_OFFSET = 2 * WINDOW * WINDOWS
#: Records of the mixed set behind ``blend``'s generic statistics (``compress --blend``'s).
GENERIC_DEFAULT = 64
VARIANTS: dict[str, dict[str, Any]] = {
    "whiten": {},
    "loss_aware": {"loss_aware": True},
    "sequential": {"sequential": True, "sequential_blocks": 4},
    "sequential_no_ridge": {"sequential": True, "sequential_blocks": 4, "sequential_ridge": 0.0},
    "loss_aware+sequential": {"loss_aware": True, "sequential": True, "sequential_blocks": 4},
    "loss_aware+sequential_no_ridge": {
        "loss_aware": True,
        "sequential": True,
        "sequential_blocks": 4,
        "sequential_ridge": 0.0,
    },
    "shrinkage": {"shrinkage": "auto"},
    # the tied embedding / LM head too (issue 15): shared factors fitted to the head's inputs and
    # the lookups, or (``_plain_embedding``) without those statistics: plain SVD of E
    "embeddings0.9": {"embeddings": 0.9},
    "embeddings0.8": {"embeddings": 0.8},
    "embeddings0.6": {"embeddings": 0.6},
    "embeddings0.8_plain_svd": {"embeddings": 0.8, "_plain_embedding": True},
    "loss_aware+shrinkage": {"loss_aware": True, "shrinkage": "auto"},
    # blend under loss-aware: the Grams and the output Fisher (session 6); ``_gram_only``: the
    # Grams only (session 5's blend); ``_fisher_weight``: exploration, the output Fisher blended
    # at a fixed weight whatever the Grams' weight
    "loss_aware+blend": {"loss_aware": True, "blend": "auto"},
    "loss_aware+blend0.5": {"loss_aware": True, "blend_weight": 0.5},
    "loss_aware+blend0.75": {"loss_aware": True, "blend_weight": 0.75},
    "loss_aware+blend0.9": {"loss_aware": True, "blend_weight": 0.9},
    # the ceiling of the generic set: its Grams and Fisher only, in the calibration's token units
    "loss_aware+blend1.0": {"loss_aware": True, "blend_weight": 1.0},
    "loss_aware+blend+fisher1": {"loss_aware": True, "blend": "auto", "_fisher_weight": 1.0},
    "loss_aware+blend_gram_only": {"loss_aware": True, "blend": "auto", "_gram_only": True},
    "loss_aware+blend0.5_gram_only": {
        "loss_aware": True,
        "blend_weight": 0.5,
        "_gram_only": True,
    },
    "loss_aware+blend0.25_gram_only": {
        "loss_aware": True,
        "blend_weight": 0.25,
        "_gram_only": True,
    },
}


def say(message: str) -> None:
    print(f"[decoder_quality {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _emma_chunks(tokenizer: Any) -> list[str]:
    from factorlm.assets import austen_dir

    ids = tokenizer((austen_dir() / "emma.txt").read_text(encoding="utf-8"))["input_ids"]
    return [tokenizer.decode(ids[i * CHUNK_TOKENS : (i + 1) * CHUNK_TOKENS]) for i in range(CHUNKS)]


def _persuasion_chunks(tokenizer: Any) -> list[str]:
    """32 chunks of *Persuasion* from token ``PERSUASION_OFFSET`` on (past the tune windows):
    a diagnostic calibration by the test novel's author; its tune figure is not held back."""
    from factorlm.assets import austen_dir

    ids = tokenizer((austen_dir() / "persuasion.txt").read_text(encoding="utf-8"))["input_ids"]
    start = PERSUASION_OFFSET
    return [
        tokenizer.decode(ids[start + i * CHUNK_TOKENS : start + (i + 1) * CHUNK_TOKENS])
        for i in range(CHUNKS)
    ]


def _review_chunks(tokenizer: Any, count: int = CHUNKS) -> list[str]:
    """Review snippets joined in file order into chunks of about ``CHUNK_TOKENS`` tokens."""
    from factorlm.assets.paths import reviews_path

    chunks: list[str] = []
    current: list[str] = []
    size = 0
    with reviews_path().open(encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["text"].strip()
            current.append(text)
            size += len(tokenizer(text)["input_ids"])
            if size >= CHUNK_TOKENS:
                chunks.append(" ".join(current))
                current, size = [], 0
                if len(chunks) == count:
                    break
    return chunks


def _ids(tokenizer: Any, novel: str) -> np.ndarray:
    from factorlm.assets import austen_dir

    text = (austen_dir() / f"{novel}.txt").read_text(encoding="utf-8")
    return np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)


def _perplexity(path: Path, ids: np.ndarray) -> float:
    from factorlm.bench.runners import OrtRunner
    from factorlm.bench.tasks import window_nll

    with OrtRunner(path, graph_optimization_level="all") as runner:
        nll, scored, _ = window_nll(runner, ids, window=WINDOW, max_windows=WINDOWS)
    return float(np.exp(nll / scored))


def _statistics(
    source: Path, texts: list[str], data: Path, need_fisher: bool, keep: Path | None = None
) -> tuple[Any, float, float]:
    """Gram (and output Fisher) on ``texts``, timed cold into a throw-away cache.

    ``keep`` (``--stats-cache``): a ``.npz`` path where the statistics and their cold times are
    saved, and from where a later run with the same texts reads them instead of collecting.
    """
    from factorlm.assets import smollm_dir
    from factorlm.calibration import CalibrationStats, collect_output_fisher, collect_statistics

    times = keep.with_suffix(".json") if keep is not None else None
    if keep is not None and times is not None and keep.is_file() and times.is_file():
        saved = json.loads(times.read_text())
        if saved["texts"] == texts and (saved["fisher_s"] or not need_fisher):
            return CalibrationStats.load(keep), saved["gram_s"], saved["fisher_s"]
    with tempfile.TemporaryDirectory(prefix="dq-cache-") as cache:
        tick = time.perf_counter()
        stats = collect_statistics(
            source, texts, max_samples=len(texts), max_length=CHUNK_TOKENS, batch_size=4,
            cache_dir=Path(cache), progress=False, holdout=True,
        )  # fmt: skip
        gram_s = time.perf_counter() - tick
        fisher_s = 0.0
        if need_fisher:
            tick = time.perf_counter()
            stats.output_fisher = collect_output_fisher(
                smollm_dir(), source, data, task="lm", max_samples=len(texts),
                max_length=CHUNK_TOKENS, batch_size=4, cache_dir=Path(cache), progress=False,
            )  # fmt: skip
            fisher_s = time.perf_counter() - tick
    if keep is not None and times is not None:
        stats.save(keep)
        times.write_text(json.dumps({"texts": texts, "gram_s": gram_s, "fisher_s": fisher_s}))
    return stats, gram_s, fisher_s


def _generic(source: Path, work: Path, fisher: bool) -> tuple[Any, dict[str, float]]:
    """The statistics on generic text that ``blend`` mixes in (as ``compress --blend`` collects
    them: the Grams, and with ``fisher`` the output Fisher), cached under ``work``; the seconds
    are those of the cold collections (``generic_s``: Grams, ``generic_fisher_s``: Fisher)."""
    from factorlm.assets import smollm_dir
    from factorlm.calibration import requested
    from factorlm.calibration.requested import generic_statistics

    count = requested.GENERIC_TEXTS
    cache = work / ("generic-cache" if count == GENERIC_DEFAULT else f"generic-cache-{count}")
    cache.mkdir(parents=True, exist_ok=True)
    times = cache / "seconds.json"
    tick = time.perf_counter()
    generic = generic_statistics(source, max_length=CHUNK_TOKENS, batch_size=4, cache_dir=cache)
    seconds = json.loads(times.read_text()) if times.is_file() else {}
    seconds.setdefault("generic_s", time.perf_counter() - tick)
    if fisher:
        tick = time.perf_counter()
        with_fisher = generic_statistics(
            source, max_length=CHUNK_TOKENS, batch_size=4, cache_dir=cache,
            fisher_weights=smollm_dir(), fisher_task="lm",
        )  # fmt: skip
        generic.output_fisher_generic = with_fisher.output_fisher_generic
        seconds.setdefault("generic_fisher_s", time.perf_counter() - tick)
    times.write_text(json.dumps(seconds))
    return generic, seconds


class _BlendLog(logging.Handler):
    """Keeps compress's log line with the blend weight chosen for each Gram."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.chosen = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Gram blend with generic text: "):
            self.chosen = message.split(": ", 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.9])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--domains",
        nargs="+",
        default=["emma"],
        choices=[
            "emma",
            "reviews",
            "reviews128",
            "mixed",
            "generated",
            "reviews+generated",
            "persuasion",
            "austen3",
        ],
        help="calibration texts: Emma (in-domain), review snippets (cross-domain), factorlm's "
        "mixed-genre set (--data mixed), text sampled by the model (--generated-samples) or "
        "half reviews, half sampled",
    )
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "decoder_quality"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--generic-texts",
        type=int,
        default=GENERIC_DEFAULT,
        help="records of the mixed-genre set that blend's generic statistics use (exploration; "
        "compress --blend uses %(default)s); rows get the suffix @genericN",
    )
    parser.add_argument(
        "--stats-cache",
        type=Path,
        default=None,
        help="save each domain's statistics (and cold times) here and reuse them in later runs",
    )
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    import factorlm

    sys.path.insert(0, str(HERE))
    from quality import exported_smollm

    load_before = uptime()
    source = exported_smollm()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent))
    evals = {"test": _ids(tokenizer, "prideprejudice"), "tune": _ids(tokenizer, "persuasion")}
    results_file = args.out / "decoder_quality.json"
    results: dict[str, Any] = (
        json.loads(results_file.read_text()) if results_file.is_file() else {"points": {}}
    )
    if "original" not in results:
        results["original"] = {k: _perplexity(source, ids) for k, ids in evals.items()}
    original = results["original"]
    say(f"original perplexity {original}")

    from factorlm.assets import smollm_dir
    from factorlm.assets.mixed import mixed_calibration_texts
    from factorlm.calibration.generated import generated_texts, with_generated

    def sampled(count: int) -> list[str]:
        return generated_texts(smollm_dir(), count, tokens=CHUNK_TOKENS)

    makers = {
        "emma": _emma_chunks,
        "reviews": _review_chunks,
        "reviews128": lambda tok: _review_chunks(tok, 4 * CHUNKS),
        "mixed": lambda _tok: mixed_calibration_texts(CHUNKS),
        "persuasion": _persuasion_chunks,
        # the mixed set's prose records only: three other Austen novels, no reviews
        "austen3": lambda _tok: mixed_calibration_texts(2 * CHUNKS)[::2],
        "generated": lambda _tok: sampled(CHUNKS),
        "reviews+generated": lambda tok: with_generated(
            _review_chunks(tok)[: CHUNKS // 2], sampled(CHUNKS // 2)
        ),
    }
    domains = {name: makers[name](tokenizer) for name in args.domains}
    need_fisher = any(VARIANTS[v].get("loss_aware") for v in args.variants)
    generic: tuple[Any, dict[str, float]] | None = None
    if any("blend" in VARIANTS[v] or "blend_weight" in VARIANTS[v] for v in args.variants):
        from factorlm.calibration import requested

        requested.GENERIC_TEXTS = args.generic_texts  # exploration: a larger generic set
        generic = _generic(source, args.work, need_fisher)
        say(f"generic statistics: {generic[0].tokens} tokens, {generic[1]} s cold")
    blend_log = _BlendLog()
    logging.getLogger("factorlm.compression").addHandler(blend_log)
    logging.getLogger("factorlm.compression").setLevel(logging.INFO)
    for domain, texts in domains.items():
        data = args.work / f"calib-{domain}.json"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text(json.dumps([{"text": t} for t in texts]))
        keep = args.stats_cache / f"stats-{domain}.npz" if args.stats_cache else None
        stats, gram_s, fisher_s = _statistics(source, texts, data, need_fisher, keep)
        say(
            f"{domain}: Gram {gram_s:.1f} s, output Fisher {fisher_s:.1f} s cold ({stats.tokens} tokens)"
        )
        for ratio in args.ratios:
            for variant in args.variants:
                out = args.work / f"{domain}-{variant}-{ratio}" / "model.onnx"
                options = dict(VARIANTS[variant])
                blends = "blend" in options or "blend_weight" in options
                given = _plain_embedding(stats) if options.pop("_plain_embedding", False) else stats
                gram_only = options.pop("_gram_only", False)
                fisher_beta = options.pop("_fisher_weight", None)
                if blends:
                    assert generic is not None
                    given = _with_generic(given, generic[0], gram_only, fisher_beta)
                blend_log.chosen = ""
                tick = time.perf_counter()
                result = factorlm.compress(
                    source, out, method="whiten", ratio=ratio, joint_qkv=False,
                    stats=given, data=data, calibration_samples=CHUNKS, max_length=CHUNK_TOKENS,
                    batch_size=4, **options,
                )  # fmt: skip
                compress_s = time.perf_counter() - tick
                point = {
                    "domain": domain,
                    "variant": variant,
                    "ratio": ratio,
                    "achieved_ratio": result.params_after / result.params_before,
                    "factorized": result.factorized,
                    "gram_s": round(gram_s, 1),
                    "fisher_s": round(fisher_s, 1) if VARIANTS[variant].get("loss_aware") else 0.0,
                    "compress_s": round(compress_s, 1),
                    **{k: _perplexity(out, ids) for k, ids in evals.items()},
                }
                if blends:
                    assert generic is not None
                    point["generic_s"] = round(generic[1]["generic_s"], 1)
                    if options.get("loss_aware") and not gram_only:
                        point["generic_fisher_s"] = round(generic[1]["generic_fisher_s"], 1)
                    point["blend_chosen"] = blend_log.chosen  # weight: number of Grams
                name = variant
                if blends and args.generic_texts != GENERIC_DEFAULT:
                    name = f"{variant}@generic{args.generic_texts}"
                    point["variant"] = name
                results["points"][f"{domain}/{name}/{ratio}"] = point
                say(json.dumps(point))
                args.out.mkdir(parents=True, exist_ok=True)
                results_file.write_text(json.dumps(results, indent=1))
    results["environment"] = environment_lines(load_before, uptime())
    results["command"] = "python benchmarks/decoder_quality.py " + " ".join(argv or sys.argv[1:])
    results_file.write_text(json.dumps(results, indent=1))
    (args.out / "decoder_quality.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def _with_generic(stats: Any, generic: Any, gram_only: bool, fisher_beta: float | None) -> Any:
    """``stats`` with the generic statistics ``compress --blend`` would collect attached.

    ``gram_only``: without the generic output Fisher (``blend`` as in session 5: the Grams
    only). ``fisher_beta`` (exploration): the output Fisher blended here at this fixed weight,
    whatever ``β`` compress then chooses for the Grams.
    """
    from factorlm.decompose import blend_gram

    given = copy.copy(stats)
    given.gram_generic, given.generic_tokens = generic.gram, generic.tokens
    given.output_fisher_generic = {} if gram_only else generic.output_fisher_generic
    if fisher_beta is not None:
        given.output_fisher = {
            name: blend_gram(
                f, stats.tokens, generic.output_fisher_generic[name], generic.tokens, fisher_beta
            )
            for name, f in stats.output_fisher.items()
        }
        given.output_fisher_generic = {}
    return given


def _plain_embedding(stats: Any) -> Any:
    """``stats`` without the tied embedding's head Gram and lookups: compress then factorizes
    the embedding by plain SVD (with a warning), as before issue 15's data-aware head."""
    plain = copy.copy(stats)
    plain.gram = {k: v for k, v in stats.gram.items() if k not in stats.token_counts}
    plain.token_counts = {}
    return plain


def _stat_time(point: dict[str, Any]) -> str:
    if "gram_s" in point:
        fisher = f" + {point['fisher_s']:.0f}" if point["fisher_s"] else ""
        generic = f" + {point['generic_s']:.0f} generic" if "generic_s" in point else ""
        if "generic_fisher_s" in point:
            generic += f" + {point['generic_fisher_s']:.0f} generic Fisher"
        return f"{point['gram_s']:.0f}{fisher}{generic}"
    return f"{point['calibrate_s']:.0f} (both, one figure)"


def markdown(results: dict[str, Any]) -> str:
    """The results as tables: one row per point, increase against the original in %."""
    original = results["original"]
    lines = [
        "# Training-free decoder quality: SmolLM2-135M-Instruct (issue 16)",
        "",
        "Written by `benchmarks/decoder_quality.py` (see its docstring for the split).",
        f"Last command: `{results.get('command', '')}`",
        "",
        *results.get("environment", []),
        "",
        f"Original perplexity: test (Pride and Prejudice) {original['test']:.2f}, "
        f"tune (Persuasion) {original['tune']:.2f}.",
        "",
        "| calibration | variant | linear params kept | test ppl | vs original | tune ppl | "
        "vs original | statistics s (cold: Gram + output Fisher) | compress s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    points = sorted(
        results["points"].values(), key=lambda p: (p["domain"], -p["ratio"], p["variant"])
    )
    for p in points:
        lines.append(
            f"| {p['domain']} | {p['variant']} | {p['ratio']:.0%} | {p['test']:.2f} | "
            f"{p['test'] / original['test'] - 1:+.1%} | {p['tune']:.2f} | "
            f"{p['tune'] / original['tune'] - 1:+.1%} | {_stat_time(p)} | "
            f"{p['compress_s']:.0f} |"
        )
    chosen = [p for p in points if p.get("blend_chosen")]
    if chosen:
        lines += [
            "",
            "Blend weights applied (weight: number of Grams; the `blend` rows chose them by "
            "held-back likelihood, the others are fixed):",
            "",
        ]
        lines += [f"- {p['domain']} / {p['variant']}: {p['blend_chosen']}" for p in chosen]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
