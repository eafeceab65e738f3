"""Task metrics: the classification probe, perplexity with and without KV cache, similarity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bench_models import WORDS, bigram_lm, bigram_weights, save_tokenizer

from factorlm.bench import run_benchmark
from factorlm.bench.accuracy import log_softmax
from factorlm.bench.runners import OrtRunner
from factorlm.bench.tasks import check_dataset, load_dataset, task_needs_labels, window_nll
from factorlm.errors import DataError


def _bigram_nll(ids: np.ndarray, targets: list[int]) -> float:
    table, unembed = bigram_weights()
    logp = log_softmax(table[ids].astype(np.float64) @ unembed.astype(np.float64))
    return -sum(float(logp[t - 1, ids[t]]) for t in targets)


@pytest.mark.parametrize("with_past", [False, True])
def test_sliding_window_nll_matches_numpy(tmp_path: Path, with_past: bool) -> None:
    path = bigram_lm(tmp_path / "lm.onnx", with_past=with_past)
    ids = np.random.default_rng(0).integers(2, 40, size=50)
    with OrtRunner(path) as runner:
        # stride < window: every token after the first is scored exactly once
        nll, scored, windows = window_nll(runner, ids, window=16, stride=8)
        assert scored == 49 and windows == 6
        assert nll == pytest.approx(_bigram_nll(ids, list(range(1, 50))), rel=1e-5)
        # stride == window: the first token of each window has no context and is skipped
        nll, scored, windows = window_nll(runner, ids, window=16)
        targets = [t for t in range(1, 50) if t % 16 != 0]
        assert (scored, windows) == (len(targets), 4)
        assert nll == pytest.approx(_bigram_nll(ids, targets), rel=1e-5)


def test_perplexity_task_end_to_end(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    bigram_lm(ref / "model.onnx", with_past=True)
    save_tokenizer(ref)
    text = tmp_path / "book.txt"
    words = np.random.default_rng(1).choice(WORDS, size=300)
    text.write_text("\n".join(" ".join(words[i : i + 30]) for i in range(0, 300, 30)))
    report = run_benchmark(
        ref,
        [ref],
        data=text,
        task="perplexity",
        window=64,
        max_windows=None,
        max_accuracy_drop=0.0,
        shapes=["1x16"],
        iterations=3,
        warmup=0,
    )
    task = report.data["task"]
    ids = np.array([WORDS.index(w) + 2 for w in words])
    expected = np.exp(
        _bigram_nll(ids, [t for t in range(1, 300) if t % 64 != 0])
        / task["details"]["tokens_scored"]
    )
    assert task["reference"] == pytest.approx(expected, rel=1e-5)
    assert task["drop"]["ref#2"] == pytest.approx(0.0, abs=1e-9) and report.passed


def test_classification_probe_and_similarity(models: dict[str, Path], reviews: Path) -> None:
    common = {"data": reviews, "shapes": ["1x8"], "iterations": 3, "warmup": 0}
    report = run_benchmark(
        models["ref"],
        [models["ref"], models["noisy"]],
        task="classification",
        max_accuracy_drop=50,
        max_fidelity_loss=1e-9,
        **common,
    )
    task = report.data["task"]
    assert task["details"]["folds"] == 5 and task["details"]["rows_scored"] == 120
    assert task["reference"] > task["details"]["majority_percent"]
    assert task["candidates"]["ref#2"] == task["reference"]  # identical model, identical probe
    assert task["drop_interval"]["ref#2"] == [0.0, 0.0] and task["agreement"]["ref#2"] == 1.0
    low, high = task["drop_interval"]["noisy"]
    assert low <= task["drop"]["noisy"] <= high and 0.0 <= task["agreement"]["noisy"] <= 1.0
    from factorlm.bench.report import render_html, render_markdown

    markdown = render_markdown(report)
    assert "95 % interval" in markdown and "agreement" in markdown
    assert "95 % interval" in render_html(report)
    fid = report.data["fidelity"]
    assert fid["ref#2"]["inputs"] == "data"
    assert fid["ref#2"]["outputs"]["last_hidden_state"]["max_abs_error"] == 0.0
    failed = {(g.candidate, g.goal.type) for g in report.failed_goals}
    assert failed == {("noisy", "max-fidelity-loss")}

    report = run_benchmark(models["ref"], [models["noisy"]], task="similarity", **common)
    sim = report.data["task"]
    assert sim["reference"] == 100.0 and 50.0 < sim["candidates"]["noisy"] < 100.0
    assert 0.9 < sim["details"]["embedding_cosine_mean"]["noisy"] < 1.0


def test_data_formats_and_label_checks(tmp_path: Path) -> None:
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("text,label\nw1 w2,pos\nw3,neg\nw4,plot\n")
    data = load_dataset(csv_file, labels=["pos", "neg"])
    assert data.texts == ["w1 w2", "w3"] and data.labels == ["pos", "neg"]
    txt = tmp_path / "d.txt"
    txt.write_text("w1 w2\n\nw3\n")
    data = load_dataset(txt)
    assert (
        data.texts == ["w1 w2", "w3"] and data.labels is None and data.raw_text == "w1 w2\n\nw3\n"
    )
    assert load_dataset(txt, skip_rows=1).raw_text == "w3"  # held-out text stays disjoint
    assert load_dataset(txt, text_column="body").texts == ["w1 w2", "w3"]  # TXT has no columns
    check_dataset(data, "perplexity")  # text-only tasks need no labels
    assert not task_needs_labels("perplexity") and task_needs_labels("classification")
    array = tmp_path / "a.json"  # a JSON array of objects is accepted here as by calibration
    array.write_text(json.dumps([{"text": "w1", "label": "pos"}, {"text": "w2", "label": "neg"}]))
    assert load_dataset(array).labels == ["pos", "neg"]
    with pytest.raises(DataError, match="no label on every row"):
        check_dataset(data, "classification")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a"}) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2"):
        load_dataset(bad)
    odd = tmp_path / "odd.jsonl"  # U+2028 inside a JSON string is not a line break
    odd.write_text(
        json.dumps({"text": "a\u2028b", "label": "x"}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    assert load_dataset(odd).texts == ["a\u2028b"]
    quoted = tmp_path / "q.csv"
    quoted.write_text('text,label\n"two\nlines",pos\n')
    assert load_dataset(quoted).texts == ["two\nlines"]
    with pytest.raises(DataError, match="'body'"):
        load_dataset(csv_file, text_column="body")
