"""Trial plumbing without Ray: stage seeding by hard links, the node benchmark lock, results."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from factorlm._common.outputs import is_owned, mark_owned
from factorlm.sweeps.select import TrialResult
from factorlm.sweeps.trial import NodeBenchLock, read_result, seed_stages, write_result


def _run_folder(root: Path, stages: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    manifest = {"config": {}, "stages": {}}
    for name, key in stages.items():
        (root / name / "sub").mkdir(parents=True)
        (root / name / "sub" / "file.bin").write_bytes(name.encode() * 10)
        mark_owned(root / name, "run")
        manifest["stages"][name] = {"key": key, "seconds": 1.0, "info": {"n": 1}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_seed_links_shared_stages_with_their_manifest_entries(tmp_path: Path) -> None:
    source = _run_folder(
        tmp_path / "a", {"export": "k1", "data": "k2", "calibrate": "k3", "compress": "k4"}
    )
    target = tmp_path / "b"
    assert seed_stages(source, target) == ["export", "data", "calibrate"]
    manifest = json.loads((target / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["export", "data", "calibrate"]  # never compress
    assert manifest["stages"]["data"]["key"] == "k2"
    linked = target / "export" / "sub" / "file.bin"
    assert linked.read_bytes() == b"export" * 10
    assert linked.stat().st_ino == (source / "export" / "sub" / "file.bin").stat().st_ino
    assert is_owned(target / "export") and not (target / "compress").exists()
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no staging left
    # already seeded (or run): left alone; the source is never modified
    assert seed_stages(source, target) == []
    # a source without a manifest (a trial that failed before any stage) seeds nothing
    assert seed_stages(tmp_path / "nothing", tmp_path / "c") == []


def test_node_lock_gives_the_benchmark_the_node(tmp_path: Path) -> None:
    events: list[str] = []
    compute = NodeBenchLock(tmp_path)
    compute.acquire(exclusive=False)

    def benchmark() -> None:
        lock = NodeBenchLock(tmp_path)
        with lock.held():
            events.append("bench-waiting")
            lock.to_exclusive()
            events.append("bench-running")
            time.sleep(0.2)
            events.append("bench-done")

    thread = threading.Thread(target=benchmark)
    thread.start()
    time.sleep(0.3)
    assert events == ["bench-waiting"]  # another trial computes: the benchmark waits
    compute.release()
    time.sleep(0.05)

    def newcomer() -> None:  # a trial starting while the benchmark holds the node
        lock = NodeBenchLock(tmp_path)
        with lock.held():
            events.append("new-trial-started")

    late = threading.Thread(target=newcomer)
    late.start()
    thread.join(5)
    late.join(5)
    compute.close()
    assert events == ["bench-waiting", "bench-running", "bench-done", "new-trial-started"]


def test_result_round_trip(tmp_path: Path) -> None:
    result = TrialResult(id="abc", params={"compress.ratio": 0.5}, status="done", speedup=1.5)
    write_result(tmp_path / "t", result)
    assert read_result(tmp_path / "t") == result
    assert read_result(tmp_path / "missing") is None
    (tmp_path / "t" / "trial.json").write_text("{half")
    assert read_result(tmp_path / "t") is None


def test_seeded_external_data_is_copied_so_onnx_reads_it(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    source = _run_folder(tmp_path / "a", {"export": "k1"})
    values = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    weight = numpy_helper.from_array(values, "w")
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weight]
    )
    onnx.save_model(
        helper.make_model(graph), str(source / "export" / "model.onnx"),
        save_as_external_data=True, location="model.onnx_data", size_threshold=0,
    )  # fmt: skip
    target = tmp_path / "b"
    assert seed_stages(source, target) == ["export"]
    data = target / "export" / "model.onnx_data"
    assert (
        data.stat().st_nlink == 1 and (source / "export" / "model.onnx_data").stat().st_nlink == 1
    )
    header = target / "export" / "model.onnx"  # the rest is still linked
    assert header.stat().st_ino == (source / "export" / "model.onnx").stat().st_ino
    for folder in (source, target):  # onnx refuses external data with several hard links
        loaded = onnx.load(str(folder / "export" / "model.onnx"))
        np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), values)


def test_seed_shares_the_reference_engine_and_scores_never_the_candidate(tmp_path: Path) -> None:
    keys = {"export": "k1", "data": "k2", "reference": "k5", "reference-scores": "k6",
            "compress": "k3", "build": "k7", "benchmark": "k8"}  # fmt: skip
    source = _run_folder(tmp_path / "a", keys)
    target = tmp_path / "b"
    assert seed_stages(source, target) == ["export", "data", "reference", "reference-scores"]
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["stages"]["reference"]["key"] == "k5"
    for name in ("compress", "build", "benchmark"):
        assert not (target / name).exists() and name not in manifest["stages"]


def test_exclusive_section_returns_the_node_to_shared_use(tmp_path: Path) -> None:
    lock = NodeBenchLock(tmp_path)
    events: list[str] = []

    def other_trial() -> None:  # computes: needs the shared lock
        other = NodeBenchLock(tmp_path)
        other.acquire(exclusive=False)
        events.append("other-computes")
        other.close()

    with lock.held():
        with lock.exclusive() as waited:
            assert lock.mode == "exclusive" and waited >= 0.0
            thread = threading.Thread(target=other_trial)
            thread.start()
            time.sleep(0.3)
            assert events == []  # the timed section has the node to itself
        assert lock.mode == "shared"  # back to computing, alongside the other trial
        thread.join(5)
        assert events == ["other-computes"]
    assert lock.mode is None


def test_pause_lets_a_waiting_benchmark_run_between_stages(tmp_path: Path) -> None:
    """A trial computing under the shared lock steps aside at ``pause``: the waiting benchmark
    times its section then, and the pausing trial goes on only after it (never alongside)."""
    events: list[str] = []
    compute = NodeBenchLock(tmp_path)
    with compute.held():
        compute.pause()  # nobody waits: it keeps the node shared at once
        assert compute.mode == "shared"

        def benchmark() -> None:
            lock = NodeBenchLock(tmp_path)
            with lock.held(), lock.exclusive():
                events.append("bench-running")
                time.sleep(0.2)
                events.append("bench-done")

        thread = threading.Thread(target=benchmark)
        thread.start()
        time.sleep(0.3)
        assert events == []  # still computing: the benchmark waits for a stage boundary
        compute.pause()
        events.append("compute-resumed")
        assert compute.mode == "shared"
        thread.join(5)
    assert events == ["bench-running", "bench-done", "compute-resumed"]
