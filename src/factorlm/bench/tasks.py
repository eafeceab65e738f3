"""Task metrics from labelled data: what the compressed model costs a user, in the user's units.

- ``classification`` (the only task that needs labels): a model with a classification head (a
  rank-2 ``logits`` output) is scored directly on every row; an encoder without one gets a probe:
  scikit-learn logistic regression trained on the *reference's* mean-pooled embeddings and
  cross-fitted over k stratified, seeded folds (default 5), so every row is scored once by a probe
  that did not train on it. The probe is the reference's, so the candidate is judged on how well
  its embeddings still serve the reference's downstream classifier. Unit: accuracy in percent; the
  drop is in percentage points, with a paired bootstrap 95 % interval over rows (``drop_interval``)
  and the rate at which the candidate predicts what the reference predicts (``agreement``).
  Goals (``max-accuracy-drop``) judge the point estimate ``drop``; the interval says how far to
  trust it.
- ``perplexity``: causal LMs over long text with sliding windows (Hugging Face's recipe: each
  window scores only the tokens the previous window did not). Decoders exported with a KV cache
  get empty ``past_key_values`` (past length 0). Unit: perplexity; the drop is the relative
  increase in percent.
- ``similarity``: embedding-similarity agreement. With ``text_pair`` and a numeric score column,
  the metric is 100 x Spearman correlation of each model's pair cosines with the scores; without,
  the reference's pairwise cosines over the texts are the ground truth (100 by definition) and the
  candidate scores 100 x their Spearman correlation with its own. Drop in points.

- ``generation`` (decoders exported with past; ``factorlm.bench.generation``): greedy
  continuations of the first rows, token agreement with the reference in percent, drop in points.

Data come from ``factorlm.data`` (JSONL, JSON, CSV, TXT, folders; a TXT file is one row per
non-empty line, and perplexity reads its exact text); tokens and feeds from
``factorlm._common.text``, the path calibration uses too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from factorlm._common.text import TextTokenizer, batch_feeds, text_feeds
from factorlm.bench.accuracy import (
    DEFAULT_FOLDS,
    DEFAULT_RESAMPLES,
    FidelityAccumulator,
    agreement_rate,
    cross_fitted_predictions,
    log_softmax,
    mean_pool,
    paired_bootstrap_drop,
)
from factorlm.bench.runners import BaseRunner, TensorMeta
from factorlm.data import TEXT_SUFFIXES, iter_records, read_corpus
from factorlm.errors import ConfigError, DataError

__all__ = [
    "TASKS",
    "Dataset",
    "check_dataset",
    "classification_task",
    "embed_texts",
    "load_dataset",
    "perplexity_task",
    "similarity_task",
    "task_needs_labels",
    "window_nll",
]

logger = logging.getLogger(__name__)

TASKS = ("classification", "perplexity", "similarity", "generation")
#: Tasks scored against labels; every other task (perplexity, generation) reads only text.
LABELLED_TASKS = frozenset({"classification"})

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
    """Rows through ``factorlm.data``; ``labels`` keeps only those classes; ``limit`` samples rows.

    Rows with a blank text are dropped. Labels are optional here (``check_dataset`` demands them
    for classification only). ``skip_rows`` drops the first non-blank rows first, e.g. the ones
    a calibration step used, so evaluation and calibration texts stay disjoint. ``raw_text`` (for
    perplexity) is a TXT file's exact text, else the texts joined by blank lines.
    """
    path = Path(path)
    if skip_rows < 0:
        raise DataError(f"skip_rows must not be negative, not {skip_rows}.")
    rows: list[dict[str, Any]] = []
    first = True
    for record in iter_records(path, text_column):
        if first and text_column not in record:
            have = ", ".join(map(str, record)) or "none"
            raise DataError(
                f"Data file {path} has no column {text_column!r} (its columns: {have})."
            )
        first = False
        text = record.get(text_column)
        if isinstance(text, str) and text.strip():
            rows.append(record)
    rows = rows[skip_rows:]
    if not rows:
        raise DataError(
            f"Data file {path} holds no rows"
            + (f" after skipping {skip_rows}." if skip_rows else ".")
        )
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
    texts = [str(r[text_column]) for r in rows]
    plain = path.is_file() and path.suffix.lower() in TEXT_SUFFIXES
    return Dataset(
        path=path,
        texts=texts,
        labels=[str(r[label_column]) for r in rows] if has_labels and label_column else None,
        pairs=[str(r[pair_column]) for r in rows] if has_pairs else None,
        scores=scores,
        raw_text=read_corpus(path, skip_rows=skip_rows) if plain else "\n\n".join(texts),
    )


def task_needs_labels(task: str | None) -> bool:
    """Whether ``task`` is scored against labels (classification) rather than text alone."""
    return task in LABELLED_TASKS


def check_dataset(dataset: Dataset, task: str) -> None:
    """Usage errors before any model runs: a task that needs labels gets a file without them."""
    if task not in TASKS:
        raise ConfigError(f"Task {task!r} is not one of {', '.join(TASKS)}.")
    if task_needs_labels(task):
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
    tokenizer: TextTokenizer,
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
    # Batches of similar lengths carry little padding (2-3x fewer tokens on review snippets);
    # the vectors are put back in the texts' order at the end.
    order = np.argsort([len(text) for text in texts], kind="stable")
    for done, mask, feeds in batch_feeds(
        runners[0].inputs,
        tokenizer,
        [texts[i] for i in order],
        batch_size=batch_size,
        max_length=max_length,
        model_name=runners[0].name,
    ):
        results = [runner.infer(feeds) for runner in runners]
        for k, outputs in enumerate(results):
            value = outputs[name]
            vectors[k].append(
                mean_pool(value, mask) if kind == "hidden" else np.asarray(value, np.float64)
            )
        if fidelity is not None:
            for acc, outputs in zip(fidelity, results[1:], strict=True):
                acc.add(results[0], outputs, mask)
        if progress is not None:
            progress("embedding texts", done, total)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return [np.concatenate(v, axis=0)[inverse] for v in vectors], kind


def _percent_drop(reference: float, value: float) -> float:
    return reference - value


def classification_task(
    runners: Sequence[BaseRunner],
    tokenizer: TextTokenizer,
    dataset: Dataset,
    *,
    seed: int = 0,
    folds: int = DEFAULT_FOLDS,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    test_fraction: float | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    fidelity: Sequence[FidelityAccumulator] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Accuracy of each model (see the module docstring); reference = runners[0].

    ``test_fraction`` is accepted for old callers and ignored: cross-fitting scores every row.
    """
    if test_fraction is not None:
        logger.debug(
            "test_fraction %s ignored: the probe is cross-fitted over %s folds",
            test_fraction,
            folds,
        )
    assert dataset.labels is not None  # checked by check_dataset before any model ran
    vectors, kind = embed_texts(
        runners,
        tokenizer,
        dataset.texts,
        batch_size=batch_size,
        max_length=max_length,
        fidelity=fidelity,
        progress=progress,
    )
    labels = np.asarray(dataset.labels)
    classes = sorted(set(dataset.labels))
    used_folds: int | None
    if kind == "logits":
        method = "head"
        used_folds = None
        if vectors[0].shape[1] != len(classes):
            raise DataError(
                f"The model's head has {vectors[0].shape[1]} classes but {dataset.path} has "
                f"{len(classes)} labels ({', '.join(classes)}); keep the labels the head was trained on."
            )
        predictions = [np.asarray(classes, dtype=labels.dtype)[v.argmax(axis=1)] for v in vectors]
    else:
        method = "logistic-regression probe on reference embeddings, cross-fitted"
        predictions, used_folds = cross_fitted_predictions(
            vectors[0], labels, vectors, folds=folds, seed=seed
        )
    correct = [p == labels for p in predictions]
    scores = [float(c.mean()) * 100 for c in correct]
    majority = max(float((labels == c).mean()) for c in classes) * 100
    result = _task_result(
        "classification",
        "accuracy_percent",
        True,
        "points",
        runners,
        scores,
        {
            "method": method,
            "folds": used_folds,
            "rows_scored": int(labels.size),
            "classes": classes,
            "majority_percent": majority,
            "seed": seed,
            "bootstrap_resamples": resamples,
            "confidence": confidence,
        },
    )
    result["drop_interval"] = {}
    result["agreement"] = {}
    for k, runner in enumerate(runners[1:], start=1):
        low, high = paired_bootstrap_drop(
            correct[0], correct[k], resamples=resamples, confidence=confidence, seed=seed
        )
        result["drop_interval"][runner.name] = [low, high]
        result["agreement"][runner.name] = agreement_rate(predictions[0], predictions[k])
    return result


def similarity_task(
    runners: Sequence[BaseRunner],
    tokenizer: TextTokenizer,
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
        runners,
        tokenizer,
        dataset.texts,
        batch_size=batch_size,
        max_length=max_length,
        fidelity=fidelity,
        progress=progress,
    )
    normed = [v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None) for v in vectors]
    extra: dict[str, Any] = {"texts": len(dataset.texts)}
    if dataset.pairs is not None and dataset.scores is not None:
        pair_vectors, _ = embed_texts(
            runners, tokenizer, dataset.pairs, batch_size=batch_size, max_length=max_length
        )
        pn = [
            v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None) for v in pair_vectors
        ]
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
            r.name: float((neighbours[0] == nb).mean())
            for r, nb in zip(runners[1:], neighbours[1:], strict=True)
        }
    extra["embedding_cosine_mean"] = {
        r.name: float((normed[0] * n).sum(axis=1).mean())
        for r, n in zip(runners[1:], normed[1:], strict=True)
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
    name = logits_name or next(
        (m.name for m in runner.outputs if m.name == "logits"), runner.outputs[0].name
    )
    total_nll, scored, windows, previous_end = 0.0, 0, 0, 0
    starts = list(range(0, max(ids.size - 1, 1), stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    for begin in starts:
        end = min(begin + window, ids.size)
        chunk = ids[begin:end][None, :]
        feeds = text_feeds(
            runner.inputs, {"input_ids": chunk, "attention_mask": np.ones_like(chunk)}
        )
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
    tokenizer: TextTokenizer,
    dataset: Dataset,
    *,
    window: int = 512,
    stride: int | None = None,
    max_windows: int | None = 8,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity of each model over the dataset's text with sliding windows."""
    ids = tokenizer.encode(dataset.raw_text)
    if ids.size < 2:
        raise DataError(f"Data file {dataset.path} tokenizes to fewer than two tokens.")
    values, scored, windows = [], 0, 0
    for runner in runners:
        nll, scored, windows = window_nll(
            runner, ids, window=window, stride=stride, max_windows=max_windows, progress=progress
        )
        values.append(float(np.exp(nll / scored)))
    result = _task_result(
        "perplexity",
        "perplexity",
        False,
        "percent",
        runners,
        values,
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
            drops[runner.name] = (
                (value / reference - 1.0) * 100.0 if reference > 0 else float("inf")
            )
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
