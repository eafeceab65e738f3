"""The reference's recorded task outputs: replayed bit for bit, unseen feeds run the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from factorlm.bench.replay import RecordingRunner, ReplayRunner, feeds_digest, load_record
from factorlm.bench.run import record_reference, run_benchmark
from factorlm.bench.runners import load_runner

COMMON = {"shapes": ["1x8"], "iterations": 3, "warmup": 0}


@pytest.mark.parametrize("task", ["classification", "similarity"])
def test_replayed_reference_gives_the_same_report_as_running_it(
    models: dict[str, Path], reviews: Path, tmp_path: Path, task: str
) -> None:
    record = tmp_path / "record"
    recorded = record_reference(models["ref"], record, data=reviews, task=task, batch_size=16)
    assert recorded["record"]["inferences"] == len(load_record(record)) > 1
    assert recorded["record"]["not_recorded"] == 0
    assert json.loads((record / "task.json").read_text())["task"]["task"] == task

    live = run_benchmark(models["ref"], [models["noisy"]], data=reviews, task=task,
                         batch_size=16, **COMMON)  # fmt: skip
    replayed = run_benchmark(models["ref"], [models["noisy"]], data=reviews, task=task,
                             batch_size=16, reference_record=record, **COMMON)  # fmt: skip
    a, b = live.data["task"], replayed.data["task"]
    assert b["reference_replay"] == {"record": str(record), "replayed": len(load_record(record)),
                                     "ran": 0}  # fmt: skip
    assert "reference_replay" not in a
    assert b["reference"] == a["reference"] == recorded["task"]["reference"]
    assert b["candidates"] == a["candidates"] and b["drop"] == a["drop"]
    assert replayed.data["fidelity"] == live.data["fidelity"]  # data fidelity: same outputs


def test_replay_answers_only_recorded_feeds(models: dict[str, Path], tmp_path: Path) -> None:
    feeds_a = {"input_ids": np.array([[2, 5, 6, 3]], np.int64),
               "attention_mask": np.ones((1, 4), np.int64)}  # fmt: skip
    feeds_b = {**feeds_a, "input_ids": np.array([[2, 6, 5, 3]], np.int64)}
    with load_runner(models["ref"]) as runner:
        recorder = RecordingRunner(runner, tmp_path)
        truth = recorder.infer(feeds_a)
        recorder.close()
        # the file holds the engine's outputs; tamper with them to see which answer is used
        rel = next(iter(load_record(tmp_path)[feeds_digest(feeds_a)].values()))
        np.save(tmp_path / rel, np.full_like(next(iter(truth.values())), 7.0))
        replay = ReplayRunner(runner, tmp_path)
        assert (replay.name, replay.inputs, replay.outputs) == (
            runner.name, runner.inputs, runner.outputs)  # fmt: skip
        assert np.all(next(iter(replay.infer(feeds_a).values())) == 7.0)  # from the record
        live_b = replay.infer(feeds_b)  # not recorded: the real engine
        for name, value in runner.infer(feeds_b).items():
            np.testing.assert_array_equal(live_b[name], value)
        assert (replay.hits, replay.misses) == (1, 1)


def test_recording_stops_at_its_budget(models: dict[str, Path], tmp_path: Path) -> None:
    feeds = [
        {"input_ids": np.array([[2, k, 3]], np.int64), "attention_mask": np.ones((1, 3), np.int64)}
        for k in (4, 5, 6)
    ]
    with load_runner(models["ref"]) as runner:
        one = sum(v.nbytes for v in runner.infer(feeds[0]).values())
        recorder = RecordingRunner(runner, tmp_path, budget_bytes=2 * one)
        for f in feeds:
            recorder.infer(f)
        info = recorder.close()
    assert info == {"inferences": 2, "bytes": 2 * one, "not_recorded": 1}
    assert feeds_digest(feeds[2]) not in load_record(tmp_path)


def test_feeds_digest_sees_dtype_shape_and_values() -> None:
    base = {"input_ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    same = {"input_ids": np.arange(6, dtype=np.int64).reshape(2, 3).copy()}
    assert feeds_digest(base) == feeds_digest(same)
    for other in (
        {"input_ids": np.arange(6, dtype=np.int32).reshape(2, 3)},
        {"input_ids": np.arange(6, dtype=np.int64).reshape(3, 2)},
        {"input_ids": np.arange(1, 7, dtype=np.int64).reshape(2, 3)},
        {"token_ids": np.arange(6, dtype=np.int64).reshape(2, 3)},
    ):
        assert feeds_digest(other) != feeds_digest(base)
