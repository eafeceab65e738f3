"""Task metrics from labelled data: what the compressed model costs a user, in the user's units.

- ``classification``: a model with a classification head (a rank-2 ``logits`` output) is scored
  directly; an encoder without one gets a probe: scikit-learn logistic regression trained on the
  *reference's* mean-pooled embeddings of a seeded, stratified train split and evaluated on both
  models' embeddings of the held-out split. The probe is the reference's, so the candidate is
  judged on how well its embeddings still serve the reference's downstream classifier.
  Unit: accuracy in percent; the drop is in percentage points.
- ``perplexity``: causal LMs over long text with sliding windows (Hugging Face's recipe: each
  window scores only the tokens the previous window did not). Decoders exported with a KV cache
  get empty ``past_key_values`` (past length 0). Unit: perplexity; the drop is the relative
  increase in percent.
- ``similarity``: embedding-similarity agreement. With ``text_pair`` and a numeric score column,
  the metric is 100 x Spearman correlation of each model's pair cosines with the scores; without,
  the reference's pairwise cosines over the texts are the ground truth (100 by definition) and the
  candidate scores 100 x their Spearman correlation with its own. Drop in points.

Data come from JSONL, CSV or TXT files; the tokenizer from the model's folder (export writes it
next to ``model.onnx``) or ``--tokenizer``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from factorlm.benchmark.accuracy import FidelityAccumulator, log_softmax, mean_pool
from factorlm.benchmark.feeds import Shape, is_past_input, make_feeds
from factorlm.benchmark.runners import BaseRunner, TensorMeta
from factorlm.errors import ConfigError, DataError

__all__ = [
    "TASKS",
    "Dataset",
    "check_dataset",
    "classification_task",
    "embed_texts",
    "load_dataset",
    "load_tokenizer",
    "perplexity_task",
    "similarity_task",
    "token_feeds",
    "window_nll",
]

logger = logging.getLogger(__name__)

TASKS = ("classification", "perplexity", "similarity")
_NEEDS_LABELS = {"classification": "label"}

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Dataset:
    """Texts with optional labels, pairs and scores, plus the raw text for perplexity."""

    path: Path
    texts: list[str]
    labels: list[str] | None
    pairs: list[str] | None
    scores: list[float] | None
    raw_text: str


def load_dataset(
    path: Path,
    *,
    text_column: str = "text",
    label_column: str | None = "label",
    pair_column: str = "text_pair",
    score_column: str = "score",
    labels: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    skip_rows: int = 0,
) -> Dataset:
    """Read JSONL/CSV/TXT rows; ``labels`` keeps only those classes; ``limit`` samples rows.

    ``skip_rows`` drops the file's first rows first, e.g. the ones a calibration step used, so
    evaluation and calibration texts stay disjoint.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Data file {path} cannot be read as UTF-8 text ({exc}).") from None
    rows: list[dict[str, Any]]
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        # split on newlines only: str.splitlines also breaks on U+2028 and U+0085 inside strings
        for number, line in enumerate(raw.split("\n"), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"Data file {path} line {number} is not valid JSON.") from None
            if not isinstance(item, dict):
                raise DataError(f"Data file {path} line {number} is not a JSON object.")
            rows.append(item)
    elif suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(io.StringIO(raw, newline=""), delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix in (".txt", ".text", ".md"):
        rows = [{text_column: line.rstrip("\r")} for line in raw.split("\n") if line.strip()]
    else:
        raise DataError(f"Data file {path} is not .jsonl, .csv or .txt.")
    rows = rows[skip_rows:]
    if not rows:
        raise DataError(f"Data file {path} holds no rows" + (f" after skipping {skip_rows}." if skip_rows else "."))
    if text_column not in rows[0]:
        raise DataError(f"Data file {path} has no {text_column!r} column.")
    has_labels = label_column is not None and all(
        label_column in r and r[label_column] not in (None, "") for r in rows
    )
    if labels is not None and has_labels and label_column is not None:
        wanted = {str(x) for x in labels}
        rows = [r for r in rows if str(r[label_column]) in wanted]
        if not rows:
            raise DataError(f"Data file {path} has no rows labelled {', '.join(sorted(wanted))}.")
    if limit is not None and len(rows) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False))
        rows = [rows[i] for i in keep]
    has_pairs = all(pair_column in r and r[pair_column] not in (None, "") for r in rows)
    scores: list[float] | None = None
    if has_pairs and all(score_column in r for r in rows):
        try:
            scores = [float(r[score_column]) for r in rows]
        except (TypeError, ValueError):
            raise DataError(f"Data file {path} has a non-numeric {score_column!r} value.") from None
    return Dataset(
        path=path,
        texts=[str(r[text_column]) for r in rows],
        labels=[str(r[label_column]) for r in rows] if has_labels and label_column else None,
        pairs=[str(r[pair_column]) for r in rows] if has_pairs else None,
        scores=scores,
        raw_text=raw if suffix in (".txt", ".text", ".md") else "\n\n".join(str(r[text_column]) for r in rows),
    )


def check_dataset(dataset: Dataset, task: str) -> None:
    """Usage errors before any model runs: a task that needs labels gets a file without them."""
    if task not in TASKS:
        raise ConfigError(f"Task {task!r} is not one of {', '.join(TASKS)}.")
    if task == "classification":
        if dataset.labels is None:
            raise DataError(
                f"Data file {dataset.path} has no label on every row, which the classification "
                "task needs."
            )
        if len(set(dataset.labels)) < 2:
            raise DataError(f"Data file {dataset.path} has fewer than two distinct labels.")
        if len(dataset.texts) < 10:
            raise DataError(f"Data file {dataset.path} has fewer than 10 labelled rows.")
    if task == "similarity" and len(dataset.texts) < 3:
        raise DataError(f"Data file {dataset.path} has fewer than 3 texts for the similarity task.")


def load_tokenizer(folders: Sequence[Path | None], explicit: Path | None = None) -> Any:
    """The tokenizer from ``explicit`` or the first model folder that holds one."""
    from transformers import AutoTokenizer

    tried = [explicit] if explicit is not None else [f for f in folders if f is not None]
    for folder in tried:
        if folder is None or not Path(folder).exists():
            continue
        has_files = any((Path(folder) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
        if not has_files and explicit is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # transformers raises many types for a bad folder
            if explicit is not None:
                raise DataError(f"Tokenizer folder {folder} cannot be loaded ({exc}).") from None
    where = explicit if explicit is not None else ", ".join(str(f) for f in tried) or "nowhere"
    raise DataError(f"No tokenizer found in {where}; pass --tokenizer FOLDER.")


def token_feeds(inputs: Sequence[TensorMeta], ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for real tokens: ids and mask from the tokenizer, the rest synthesised (past empty)."""
    batch, seq = ids.shape
    base = make_feeds(inputs, Shape(batch, seq), rng=np.random.default_rng(0))
    feeds: dict[str, np.ndarray] = {}
    for meta in inputs:
        dtype = np.dtype(meta.dtype)
        if meta.name == "input_ids":
            feeds[meta.name] = ids.astype(dtype)
        elif meta.name == "attention_mask":
            feeds[meta.name] = mask.astype(dtype)
        elif "position" in meta.name and not is_past_input(meta.name):
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
            feeds[meta.name] = positions.astype(dtype)
        elif "use_cache" in meta.name:
            feeds[meta.name] = np.zeros(base[meta.name].shape, dtype=dtype)
        else:
            feeds[meta.name] = base[meta.name]
    return feeds


def _embedding_output(outputs: Sequence[TensorMeta]) -> tuple[str, str]:
    """(output name, kind): a rank-3 hidden state to pool, or a rank-2 embedding/logits."""
    for meta in outputs:
        if meta.name == "logits" and len(meta.shape) == 2:
            return meta.name, "logits"
    for meta in outputs:
        if len(meta.shape) == 3:
            return meta.name, "hidden"
    for meta in outputs:
        if len(meta.shape) == 2:
            return meta.name, "embedding"
    raise DataError(f"Model output {outputs[0].name} is neither a hidden state nor an embedding.")


def embed_texts(
    runners: Sequence[BaseRunner],
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    fidelity: Sequence[FidelityAccumulator] | None = None,
    progress: Progress | None = None,
) -> tuple[list[np.ndarray], str]:
    """Sentence vectors of every runner on identical token batches (reference = runners[0]).

    Fidelity of runners[1:] against runners[0] on these real inputs accumulates into
    ``fidelity`` as a side effect, so one pass over the data serves both purposes.
    """
    name, kind = _embedding_output(runners[0].outputs)
    vectors: list[list[np.ndarray]] = [[] for _ in runners]
    total = len(texts)
    for start in range(0, total, batch_size):
        chunk = list(texts[start : start + batch_size])
        encoded = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        ids = np.asarray(encoded["input_ids"])
        mask = np.asarray(encoded.get("attention_mask", np.ones_like(ids)))
        feeds = token_feeds(runners[0].inputs, ids, mask)
        results = [runner.infer(feeds) for runner in runners]
        for k, outputs in enumerate(results):
            value = outputs[name]
            vectors[k].append(mean_pool(value, mask) if kind == "hidden" else np.asarray(value, np.float64))
        if fidelity is not None:
            for acc, outputs in zip(fidelity, results[1:], strict=True):
                acc.add(results[0], outputs, mask)
        if progress is not None:
            progress("embedding texts", min(start + batch_size, total), total)
    return [np.concatenate(v, axis=0) for v in vectors], kind


def _percent_drop(reference: float, value: float) -> float:
    return reference - value


def classification_task(
    runners: Sequence[BaseRunner],
    tokenizer: Any,
    dataset: Dataset,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    batch_size: int = 32,
    max_length: int = 128,
    fidelity: Sequence[FidelityAccumulator] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Accuracy of each model (see the module docstring); reference = runners[0]."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    assert dataset.labels is not None  # checked by check_dataset before any model ran
    vectors, kind = embed_texts(
        runners, tokenizer, dataset.texts, batch_size=batch_size, max_length=max_length,
        fidelity=fidelity, progress=progress,
    )
    labels = np.asarray(dataset.labels)
    classes = sorted(set(dataset.labels))
    index = np.arange(labels.size)
    train, test = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=labels
    )
    if kind == "logits":
        method = "head"
        y = np.asarray([classes.index(x) for x in labels])
        scores = [float((v[test].argmax(axis=1) == y[test]).mean()) * 100 for v in vectors]
    else:
        method = "logistic-regression probe on reference embeddings"
        probe = LogisticRegression(max_iter=2000)
        probe.fit(vectors[0][train], labels[train])
        scores = [float(probe.score(v[test], labels[test])) * 100 for v in vectors]
    majority = max(float((labels[test] == c).mean()) for c in classes) * 100
    return _task_result(
        "classification", "accuracy_percent", True, "points", runners, scores,
        {"method": method, "train": int(train.size), "test": int(test.size), "classes": classes,
         "majority_percent": majority, "seed": seed},
    )


def similarity_task(
    runners: Sequence[BaseRunner],
    tokenizer: Any,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    fidelity: Sequence[FidelityAccumulator] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Embedding-similarity agreement (see the module docstring)."""
    from scipy.stats import spearmanr

    vectors, _ = embed_texts(
        runners, tokenizer, dataset.texts, batch_size=batch_size, max_length=max_length,
        fidelity=fidelity, progress=progress,
    )
    normed = [v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None) for v in vectors]
    extra: dict[str, Any] = {"texts": len(dataset.texts)}
    if dataset.pairs is not None and dataset.scores is not None:
        pair_vectors, _ = embed_texts(runners, tokenizer, dataset.pairs, batch_size=batch_size, max_length=max_length)
        pn = [v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None) for v in pair_vectors]
        sims = [(a * b).sum(axis=1) for a, b in zip(normed, pn, strict=True)]
        scores = [float(spearmanr(s, dataset.scores).statistic) * 100 for s in sims]
        extra["ground_truth"] = "scores"
    else:
        upper = np.triu_indices(len(dataset.texts), k=1)
        sims = [(n @ n.T)[upper] for n in normed]
        scores = [100.0] + [float(spearmanr(sims[0], s).statistic) * 100 for s in sims[1:]]
        neighbours = []
        for n in normed:
            m = n @ n.T
            np.fill_diagonal(m, -np.inf)
            neighbours.append(m.argmax(axis=1))
        extra["ground_truth"] = "reference pairwise cosines"
        extra["nearest_neighbour_agreement"] = {
            r.name: float((neighbours[0] == nb).mean()) for r, nb in zip(runners[1:], neighbours[1:], strict=True)
        }
    extra["embedding_cosine_mean"] = {
        r.name: float((normed[0] * n).sum(axis=1).mean()) for r, n in zip(runners[1:], normed[1:], strict=True)
    }
    return _task_result("similarity", "spearman_x100", True, "points", runners, scores, extra)


def window_nll(
    runner: BaseRunner,
    ids: np.ndarray,
    *,
    window: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    logits_name: str | None = None,
    progress: Progress | None = None,
) -> tuple[float, int, int]:
    """Summed negative log-likelihood, scored tokens and windows of a causal LM over ``ids``.

    Each window of up to ``window`` tokens starts ``stride`` after the previous one and scores
    only the tokens past the previous window's end, so no token is scored twice; with
    ``stride < window`` every token after the first is scored, with at least ``window - stride``
    tokens of left context once the first window is done.
    """
    stride = stride or window
    if stride > window or stride < 1:
        raise ConfigError(f"Perplexity stride {stride} must be between 1 and the window {window}.")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    name = logits_name or next((m.name for m in runner.outputs if m.name == "logits"), runner.outputs[0].name)
    total_nll, scored, windows, previous_end = 0.0, 0, 0, 0
    starts = list(range(0, max(ids.size - 1, 1), stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    for begin in starts:
        end = min(begin + window, ids.size)
        chunk = ids[begin:end][None, :]
        feeds = token_feeds(runner.inputs, chunk, np.ones_like(chunk))
        logits = runner.infer(feeds)[name][0]
        logp = log_softmax(logits[:-1])
        targets = chunk[0, 1:]
        picked = logp[np.arange(targets.size), targets]
        new = end - max(previous_end, begin + 1)
        total_nll -= float(picked[picked.size - new :].sum())
        scored += new
        windows += 1
        previous_end = end
        if progress is not None:
            progress(f"perplexity {runner.name}", windows, len(starts))
        if end >= ids.size:
            break
    return total_nll, scored, windows


def perplexity_task(
    runners: Sequence[BaseRunner],
    tokenizer: Any,
    dataset: Dataset,
    *,
    window: int = 512,
    stride: int | None = None,
    max_windows: int | None = 8,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity of each model over the dataset's text with sliding windows."""
    ids = np.asarray(tokenizer(dataset.raw_text, return_tensors="np")["input_ids"]).reshape(-1)
    if ids.size < 2:
        raise DataError(f"Data file {dataset.path} tokenizes to fewer than two tokens.")
    values, scored, windows = [], 0, 0
    for runner in runners:
        nll, scored, windows = window_nll(
            runner, ids, window=window, stride=stride, max_windows=max_windows, progress=progress
        )
        values.append(float(np.exp(nll / scored)))
    result = _task_result(
        "perplexity", "perplexity", False, "percent", runners, values,
        {"window": window, "stride": stride or window, "windows": windows, "tokens_scored": scored},
    )
    return result


def _task_result(
    task: str,
    metric: str,
    higher_is_better: bool,
    drop_unit: str,
    runners: Sequence[BaseRunner],
    values: Sequence[float],
    details: dict[str, Any],
) -> dict[str, Any]:
    reference = values[0]
    drops: dict[str, float] = {}
    for runner, value in zip(runners[1:], values[1:], strict=True):
        if drop_unit == "percent":  # lower is better: relative increase in percent
            drops[runner.name] = (value / reference - 1.0) * 100.0 if reference > 0 else float("inf")
        else:
            drops[runner.name] = _percent_drop(reference, value)
    return {
        "task": task,
        "metric": metric,
        "higher_is_better": higher_is_better,
        "drop_unit": drop_unit,
        "reference": reference,
        "candidates": {r.name: v for r, v in zip(runners[1:], values[1:], strict=True)},
        "drop": drops,
        "details": details,
    }
