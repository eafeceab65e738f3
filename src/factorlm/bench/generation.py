"""The generation task and ``factorlm.generate``: what a compressed decoder actually writes.

Every engine greedily decodes ``max_new_tokens`` tokens (EOS ignored, so every engine produces
the same number) from each of the first ``prompts`` rows of the data file, one prompt at a time
(batch 1) with its KV cache carried between steps (``bench.decode.greedy_generate``). Against
the reference engine (runners[0]) each candidate gets:

- ``token agreement``: the share of the generated positions where the candidate's token equals
  the reference's token at the same position (free running, not teacher forced: after a first
  difference the continuations usually drift apart). Reported in percent; the task's drop is
  ``100 - agreement`` points, so ``max-accuracy-drop`` goals apply.
- ``first divergence``: the mean index of the first differing token (``max_new_tokens`` when
  the whole continuation agrees) and the share of prompts whose continuation agrees entirely.
- ``tokens/s``: generated tokens over the wall time of the decode loops (feeds, inference,
  argmax), for every engine including the reference.

A few prompts with the reference's and each candidate's continuation go into the report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from factorlm._common.text import TextTokenizer, find_tokenizer
from factorlm.bench.decode import DecoderLayout, GenerationRun, decoder_layout, greedy_generate
from factorlm.bench.runners import BaseRunner, load_runner
from factorlm.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_PROMPTS",
    "eos_token_ids",
    "generate_texts",
    "generation_task",
    "require_decoder",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_PROMPTS = 8
#: Prompts shown with their continuations in the report.
SAMPLES_SHOWN = 3

Progress = Callable[[str, int, int], None]


def require_decoder(runner: BaseRunner) -> DecoderLayout:
    """The runner's cache layout, or a ConfigError saying generation needs a model with past."""
    layout = decoder_layout(runner.inputs, runner.outputs)
    if layout is None:
        raise ConfigError(
            f"Generation needs a decoder exported with its KV cache (text-generation-with-past); "
            f"{runner.name} has no past_key_values inputs."
        )
    return layout


def _prompt_ids(tokenizer: TextTokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    prompts = []
    for text in texts:
        ids = tokenizer.encode(text)[:max_length].tolist()
        if not ids:
            raise DataError(f"The prompt {text[:40]!r} tokenizes to no tokens.")
        prompts.append(ids)
    return prompts


def generation_task(
    runners: Sequence[BaseRunner],
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_length: int = 128,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Greedy continuations of ``texts`` on every runner, scored against runners[0]."""
    layouts = [require_decoder(r) for r in runners]
    prompts = _prompt_ids(tokenizer, texts, max_length)
    runs: list[list[GenerationRun]] = [[] for _ in runners]
    total = len(prompts) * len(runners)
    done = 0
    for p, prompt in enumerate(prompts):
        order = range(len(runners)) if p % 2 == 0 else reversed(range(len(runners)))
        for k in order:  # alternate the order so a drifting machine hits every engine alike
            runs[k].append(greedy_generate(runners[k], layouts[k], prompt, max_new_tokens))
            done += 1
            if progress is not None:
                progress("generation", done, total)
    ref = runs[0]
    agreement: dict[str, float] = {}
    divergence: dict[str, float] = {}
    exact: dict[str, float] = {}
    for runner, cand in zip(runners[1:], runs[1:], strict=True):
        same = [
            np.asarray(a.tokens) == np.asarray(b.tokens) for a, b in zip(ref, cand, strict=True)
        ]
        agreement[runner.name] = float(np.mean(np.concatenate(same))) * 100.0
        firsts = [int(np.argmin(s)) if not s.all() else s.size for s in same]
        divergence[runner.name] = float(np.mean(firsts))
        exact[runner.name] = float(np.mean([s.all() for s in same]))
    speed = {
        r.name: sum(len(x.tokens) for x in rs) / max(sum(x.seconds for x in rs), 1e-12)
        for r, rs in zip(runners, runs, strict=True)
    }
    samples = [
        {
            "prompt": texts[i],
            "reference": tokenizer.decode(ref[i].tokens),
            "candidates": {
                r.name: tokenizer.decode(rs[i].tokens)
                for r, rs in zip(runners[1:], runs[1:], strict=True)
            },
        }
        for i in range(min(SAMPLES_SHOWN, len(prompts)))
    ]
    return {
        "task": "generation",
        "metric": "token_agreement_percent",
        "higher_is_better": True,
        "drop_unit": "points",
        "reference": 100.0,
        "candidates": agreement,
        "drop": {name: 100.0 - value for name, value in agreement.items()},
        "details": {
            "decoding": "greedy, batch 1 per prompt, KV cache carried, EOS ignored",
            "max_new_tokens": max_new_tokens,
            "prompts": len(prompts),
            "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
            "max_length": max_length,
            "first_divergence_mean": divergence,
            "exact_match_rate": exact,
            "tokens_per_s": speed,
        },
        "samples": samples,
    }


def eos_token_ids(folder: Path | None, tokenizer: TextTokenizer) -> list[int]:
    """EOS ids from generation_config.json / config.json beside the model, else the tokenizer's."""
    for name in ("generation_config.json", "config.json"):
        path = folder / name if folder is not None else None
        if path is None or not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int):
            return [value]
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return list(value)
    eos = tokenizer.token_id("eos_token")
    return [eos] if eos is not None else []


def generate_texts(
    model: Path,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    tokenizer: Path | None = None,
    stop_at_eos: bool = True,
    max_length: int = 1024,
    providers: Sequence[str] | None = None,
    threads: int = 0,
) -> list[str]:
    """The greedy continuation of each prompt (without the prompt) by one ONNX Runtime engine."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens is {max_new_tokens}; it must be >= 1.")
    runner = load_runner(
        Path(model), backend="onnxruntime", providers=providers, intra_op_threads=threads
    )
    folder = runner.folder or runner.path.parent
    tok = TextTokenizer(find_tokenizer(folder, Path(model), explicit=tokenizer))
    eos = eos_token_ids(folder, tok) if stop_at_eos else []
    with runner:
        layout = require_decoder(runner)
        ids = _prompt_ids(tok, prompts, max_length)
        runs = [greedy_generate(runner, layout, p, max_new_tokens, eos_ids=eos) for p in ids]
    return [tok.decode([t for t in run.tokens if t not in eos]) for run in runs]
