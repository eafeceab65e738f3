"""The data stage's split: perplexity keeps the text in order, classification shuffles rows.

Perplexity scores running text, so calibration is the start of the text and evaluation its end
(contiguous, disjoint); shuffled lines would make the held-out "text" a bag of sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factorlm.options import BenchOptions
from factorlm.pipeline.config import RunConfig, parse_config
from factorlm.pipeline.stages import benchmark, split_data


def _config(task: str, **data: object) -> RunConfig:
    return parse_config(
        {
            "data": {"calibration_samples": 20, "eval_samples": 30, "labels": None, **data},
            "benchmark": {"task": task},
        }
    )


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("task", ["perplexity", "auto"])
def test_perplexity_split_is_contiguous_start_and_end(tmp_path: Path, task: str) -> None:
    lines = [f"line {i} of the novel." for i in range(100)]
    text = tmp_path / "novel.txt"
    text.write_text("\n\n".join(lines) + "\n", encoding="utf-8")  # blank lines are skipped
    out = tmp_path / "split"
    out.mkdir()
    info = split_data(_config(task), text, out)
    calib = [r["text"] for r in _rows(out / "calibration.jsonl")]
    evaluation = [r["text"] for r in _rows(out / "eval.jsonl")]
    train = [r["text"] for r in _rows(out / "train.jsonl")]
    assert calib == lines[:20]
    assert evaluation == lines[70:]
    assert train == lines[:70] and not set(train) & set(evaluation)
    assert (out / "eval.txt").read_text(encoding="utf-8") == "\n".join(lines[70:]) + "\n"
    assert info["split"] == "contiguous" and info["eval_offset"] == 70


def test_classification_split_stays_shuffled(tmp_path: Path) -> None:
    rows = [{"text": f"review {i}", "label": ("fresh", "rotten")[i % 2]} for i in range(100)]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "split"
    out.mkdir()
    info = split_data(_config("classification"), data, out)
    evaluation = _rows(out / "eval.jsonl")
    calib = _rows(out / "calibration.jsonl")
    assert info["split"] == "shuffled" and not (out / "eval.txt").exists()
    assert len(calib) == 20 and len(evaluation) == 30
    assert [r["text"] for r in calib] != [f"review {i}" for i in range(20)]
    assert not {r["text"] for r in calib} & {r["text"] for r in evaluation}


def test_benchmark_scores_the_contiguous_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import factorlm.bench.run

    split = tmp_path / "split"
    split.mkdir()
    (split / "eval.txt").write_text("the end of the text\n")
    (split / "eval.jsonl").write_text('{"text": "the end of the text"}\n')
    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def fake(
        reference: object,
        candidates: object,
        options: object,
        *,
        data: Path,
        reference_record: Path | None = None,
        timing_guard: object = None,
    ) -> None:
        seen.update(options=options, data=data)
        raise Stop

    monkeypatch.setattr(factorlm.bench.run, "run_benchmark", fake)
    with pytest.raises(Stop):
        benchmark(_config("auto", label_column="label"), tmp_path, tmp_path, split, tmp_path)
    assert seen["data"] == split / "eval.txt"
    options = seen["options"]
    assert isinstance(options, BenchOptions) and options.label_column is None
