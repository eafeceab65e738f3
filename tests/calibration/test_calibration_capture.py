"""collect_statistics against activations computed by hand in numpy, on a tiny token model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from factorlm._common.text import TextTokenizer
from factorlm.calibration import CalibrationStats, collect_statistics, find_targets
from factorlm.errors import ConfigError, DataError

VOCAB, D, H, K = 26, 8, 12, 5
TEXTS = [
    "the film is a good movie",
    "bad plot",
    "the story is long and boring and the actor is awful",
    "great",
    "funny sad clever quiet loud short best worst",
    "the best",
    "a long long long story",
]


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "emb": rng.standard_normal((VOCAB, D)).astype(np.float32),
        "w1": rng.standard_normal((D, H)).astype(np.float32),
        "w2": rng.standard_normal((H, K)).astype(np.float32),
        "w3": rng.standard_normal((D, K)).astype(np.float32),
        "w_left": rng.standard_normal((3, 3)).astype(np.float32),
    }


def _model(folder: Path) -> Path:
    """ids -> Gather(emb) = E;  E@w1 -> Relu -> @w2;  Gemm(transA=1) of (E as rows)ᵀ with w3.

    A MatMul with the initializer on the left (w_left @ ...) must not be a target.
    """
    w = _weights()
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["E"]),
        helper.make_node("MatMul", ["E", "w1"], ["P"]),
        helper.make_node("Relu", ["P"], ["R"]),
        helper.make_node("MatMul", ["R", "w2"], ["Y"]),
        helper.make_node("Reshape", ["E", "flat"], ["E2"]),
        helper.make_node("Transpose", ["E2"], ["ET"], perm=[1, 0]),
        helper.make_node("Gemm", ["ET", "w3"], ["Z"], transA=1),
        helper.make_node("MatMul", ["w_left", "w_left"], ["C"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", "s", K]),
            helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["n", K]),
            helper.make_tensor_value_info("C", TensorProto.FLOAT, [3, 3]),
        ],
        [numpy_helper.from_array(v, k) for k, v in w.items()]
        + [numpy_helper.from_array(np.array([-1, D], dtype=np.int64), "flat")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def model_dir(tmp_path: Path, tiny_tokenizer_dir: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for file in tiny_tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    _model(folder)
    return folder


def _expected(tokenizer_dir: Path, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """Rows of each weight's input for every real (non-padding) token, computed in numpy."""
    w = _weights()
    tok = TextTokenizer(tokenizer_dir)
    rows_e, rows_r = [], []
    for text in texts:  # one at a time: no padding at all
        ids = tok([text], max_length)["input_ids"][0]
        e = w["emb"][ids].astype(np.float64)
        rows_e.append(e)
        rows_r.append(np.maximum(e @ w["w1"].astype(np.float64), 0))
    e_all, r_all = np.concatenate(rows_e), np.concatenate(rows_r)
    return {"w1": e_all, "w2": r_all, "w3": e_all}


def test_targets_resolve_matmul_gemm_and_skip_left_weights(model_dir: Path) -> None:
    targets = find_targets(onnx.load(str(model_dir / "model.onnx")))
    by_weight = {t.weight: t for t in targets}
    assert set(by_weight) == {"w1", "w2", "w3"}
    assert (by_weight["w1"].activation, by_weight["w1"].in_features) == ("E", D)
    assert by_weight["w3"].transpose and by_weight["w3"].activation == "ET"
    assert (by_weight["w2"].in_features, by_weight["w2"].out_features) == (H, K)


def test_statistics_match_numpy_and_exclude_padding(model_dir: Path, tmp_path: Path) -> None:
    stats = collect_statistics(
        model_dir / "model.onnx",
        TEXTS,
        batch_size=3,  # batches of uneven lengths: padding must be dropped
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    expected = _expected(model_dir, TEXTS, 128)
    assert stats.tokens == expected["w1"].shape[0]
    for name, x in expected.items():
        gram = x.T @ x
        scale = np.abs(gram).max()
        np.testing.assert_allclose(stats.gram[name], gram, rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(stats.mean_abs[name], np.abs(x).mean(0), rtol=1e-5, atol=1e-7)
        assert stats.gram[name].dtype == np.float64
        np.testing.assert_array_equal(stats.gram[name], stats.gram[name].T)


def test_batching_does_not_change_statistics(model_dir: Path, tmp_path: Path) -> None:
    one = collect_statistics(
        model_dir / "model.onnx", TEXTS, batch_size=1, cache_dir=tmp_path / "a", progress=False
    )
    many = collect_statistics(
        model_dir / "model.onnx", TEXTS, batch_size=7, cache_dir=tmp_path / "b", progress=False
    )
    assert one.tokens == many.tokens
    for name in one.gram:
        np.testing.assert_allclose(one.gram[name], many.gram[name], rtol=1e-6)


def test_truncation_and_max_samples(model_dir: Path, tmp_path: Path) -> None:
    stats = collect_statistics(
        model_dir / "model.onnx",
        TEXTS,
        max_samples=4,
        max_length=4,
        cache_dir=tmp_path,
        progress=False,
    )
    expected = _expected(model_dir, TEXTS[:4], 4)
    assert stats.tokens == expected["w1"].shape[0] <= 4 * 4


def test_cache_hit_and_npz_round_trip(model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = collect_statistics(model_dir / "model.onnx", TEXTS, cache_dir=cache, progress=False)
    files = list(cache.glob("stats-*.npz"))
    assert len(files) == 1
    again = collect_statistics(model_dir / "model.onnx", TEXTS, cache_dir=cache, progress=False)
    assert again.tokens == first.tokens
    for name in first.gram:
        np.testing.assert_array_equal(again.gram[name], first.gram[name])
    # Other settings -> another cache entry.
    collect_statistics(
        model_dir / "model.onnx", TEXTS, max_length=5, cache_dir=cache, progress=False
    )
    assert len(list(cache.glob("stats-*.npz"))) == 2

    odd = CalibrationStats(
        gram={"a/b::c.weight": np.eye(2)},
        mean_abs={"a/b::c.weight": np.ones(2)},
        fisher={"x": np.arange(3.0)},
        tokens=7,
    )
    loaded = CalibrationStats.load(odd.save(tmp_path / "odd.npz"))
    assert loaded.tokens == 7
    np.testing.assert_array_equal(loaded.gram["a/b::c.weight"], np.eye(2))
    np.testing.assert_array_equal(loaded.fisher["x"], np.arange(3.0))


def test_weights_filter(model_dir: Path, tmp_path: Path) -> None:
    stats = collect_statistics(
        model_dir / "model.onnx", TEXTS, weights=["w2"], cache_dir=tmp_path, progress=False
    )
    assert set(stats.gram) == {"w2"}
    with pytest.raises(ConfigError, match="nope"):
        collect_statistics(
            model_dir / "model.onnx", TEXTS, weights=["nope"], cache_dir=tmp_path, progress=False
        )


def test_reads_jsonl_with_column(model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"review": t, "label": "x"}) + "\n" for t in TEXTS))
    stats = collect_statistics(
        model_dir / "model.onnx", data, text_column="review", cache_dir=tmp_path, progress=False
    )
    assert stats.tokens == _expected(model_dir, TEXTS, 128)["w1"].shape[0]


def test_bad_inputs_are_one_sentence_data_errors(model_dir: Path, tmp_path: Path) -> None:
    model = model_dir / "model.onnx"
    data = tmp_path / "calib.jsonl"
    data.write_text(json.dumps({"body": "the film"}) + "\n")
    with pytest.raises(DataError, match="no column 'text'"):
        collect_statistics(model, data, cache_dir=tmp_path, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no non-empty texts"):
        collect_statistics(model, empty, cache_dir=tmp_path, progress=False)
    # 1 text of 2 words = 4 tokens, fewer than w1's 8 input features.
    with pytest.raises(DataError, match="4 tokens to weight w1, fewer than its 8 input features"):
        collect_statistics(model, ["bad plot"], cache_dir=tmp_path, progress=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(model, bare / "model.onnx")
    with pytest.raises(DataError, match="No tokenizer"):
        collect_statistics(bare / "model.onnx", TEXTS, cache_dir=tmp_path, progress=False)
    # An explicit tokenizer folder works for a model without one.
    stats = collect_statistics(
        bare / "model.onnx", TEXTS, tokenizer=model_dir, cache_dir=tmp_path, progress=False
    )
    assert stats.tokens > 0


def test_ray_workers_gather_the_local_statistics(
    ray_cluster: Any, model_dir: Path, tmp_path: Path
) -> None:
    """Two Ray tasks on shards of the texts, sums added: the local statistics, held-back part too.

    7 batches of one text on 2 CPUs, no Gram budget (so one pass, split by text): the second
    shard starts at batch 3, the held-back one. (Within a budget: test_calibration_ray.py.)
    """
    model = model_dir / "model.onnx"
    kwargs: dict[str, Any] = {
        "batch_size": 1, "holdout": True, "progress": False, "gram_budget": "none",
    }  # fmt: skip
    local = collect_statistics(model, TEXTS, cache_dir=tmp_path / "local", **kwargs)
    remote = collect_statistics(
        model, TEXTS, cache_dir=tmp_path / "ray", ray_address=ray_cluster.address, **kwargs
    )
    assert remote.tokens == local.tokens and remote.heldout_tokens == local.heldout_tokens > 0
    for table in ("gram", "gram_heldout", "mean_abs"):
        mine, theirs = getattr(local, table), getattr(remote, table)
        assert mine.keys() == theirs.keys() == {"w1", "w2", "w3"}
        for name, value in mine.items():
            scale = np.abs(value).max()
            np.testing.assert_allclose(theirs[name], value, rtol=1e-10, atol=1e-10 * scale)


def test_ray_statistics_without_ray_name_the_extra(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"needs Ray, which is not installed: pip install"):
        collect_statistics(
            model_dir / "model.onnx", TEXTS, cache_dir=tmp_path, progress=False, ray_address="auto"
        )


def test_external_data_model_is_calibrated_from_its_files(model_dir: Path, tmp_path: Path) -> None:
    """A model with external data (threshold 0) gives the inline model's statistics, and its
    folder is left as it was (the instrumented header and links live in a scratch folder)."""
    inline = collect_statistics(
        model_dir / "model.onnx", TEXTS, batch_size=3, cache_dir=tmp_path / "c1", progress=False
    )
    ext_dir = tmp_path / "external"
    shutil.copytree(model_dir, ext_dir)
    model = onnx.load(str(ext_dir / "model.onnx"))
    onnx.save_model(
        model,
        str(ext_dir / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in ext_dir.iterdir())
    stats = collect_statistics(
        ext_dir / "model.onnx", TEXTS, batch_size=3, cache_dir=tmp_path / "c2", progress=False
    )
    after = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in ext_dir.iterdir())
    assert before == after
    assert stats.tokens == inline.tokens
    for name, gram in inline.gram.items():
        np.testing.assert_array_equal(stats.gram[name], gram)
        np.testing.assert_array_equal(stats.gram[name], stats.gram[name].T)


def test_external_data_with_a_second_link_is_calibrated(model_dir: Path, tmp_path: Path) -> None:
    """While another calibration shard on this machine (``compress --ray``) holds its scratch
    link to the data file, the file has two hard links, which onnx's own loader refuses; the
    small tensors are read by offset instead, with the same statistics."""
    import os

    inline = collect_statistics(
        model_dir / "model.onnx", TEXTS, batch_size=3, cache_dir=tmp_path / "c1", progress=False
    )
    model = onnx.load(str(model_dir / "model.onnx"))
    onnx.save_model(
        model, str(model_dir / "model.onnx"), save_as_external_data=True,
        location="model.onnx.data", size_threshold=0,
    )  # fmt: skip
    os.link(model_dir / "model.onnx.data", tmp_path / "other-shard.data")
    stats = collect_statistics(
        model_dir / "model.onnx", TEXTS, batch_size=3, cache_dir=tmp_path / "c2", progress=False
    )
    assert stats.tokens == inline.tokens and stats.gram.keys() == inline.gram.keys()
    for name, gram in inline.gram.items():
        np.testing.assert_array_equal(stats.gram[name], gram)


def test_missing_external_data_is_one_sentence(model_dir: Path, tmp_path: Path) -> None:
    from factorlm.errors import ModelLoadError

    model = onnx.load(str(model_dir / "model.onnx"))
    onnx.save_model(
        model,
        str(model_dir / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    (model_dir / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"weights\.bin"):
        collect_statistics(
            model_dir / "model.onnx", TEXTS, cache_dir=tmp_path / "c", progress=False
        )


@pytest.mark.parametrize("n", [3, 512, 1029])
def test_symmetric_fills_the_lower_triangle_in_place(n: int) -> None:
    from factorlm.calibration.capture import _symmetric

    rng = np.random.default_rng(n)
    x = rng.standard_normal((7, n))
    gram = x.T @ x
    upper = np.asfortranarray(np.triu(gram) + np.tril(rng.standard_normal((n, n)), -1))
    out = _symmetric(upper)
    assert out is upper
    np.testing.assert_array_equal(out, np.triu(gram) + np.triu(gram, 1).T)


@pytest.mark.parametrize("holdout", [False, True])
def test_gram_budget_passes_give_the_same_statistics(
    model_dir: Path, tmp_path: Path, holdout: bool
) -> None:
    """Grams over the budget are captured in several passes and spilled to memory maps: the
    statistics (and the saved file) equal one pass's value for value."""
    texts = TEXTS * 3
    one = collect_statistics(
        model_dir / "model.onnx", texts, batch_size=2, cache_dir=tmp_path / "c1",
        progress=False, holdout=holdout, gram_budget="none",
    )  # fmt: skip
    # 8 B x (8^2 + 12^2) per pass at most: w1/w3 (width 8) and w2 (width 12) apart
    passes = collect_statistics(
        model_dir / "model.onnx", texts, batch_size=2, cache_dir=tmp_path / "c2",
        progress=False, holdout=holdout, gram_budget=8 * 12 * 12 * (2 if holdout else 1),
    )  # fmt: skip
    assert passes.tokens == one.tokens and passes.heldout_tokens == one.heldout_tokens
    assert set(passes.gram) == set(one.gram) == {"w1", "w2", "w3"}
    assert any(isinstance(g, np.memmap) for g in passes.gram.values())
    for table in ("gram", "mean_abs", "gram_heldout"):
        mine, theirs = getattr(passes, table), getattr(one, table)
        assert set(mine) == set(theirs)
        for name, value in theirs.items():
            np.testing.assert_array_equal(mine[name], value)
    reloaded = CalibrationStats.load(next((tmp_path / "c2").glob("*.npz")), mmap=True)
    for name, value in one.gram.items():
        np.testing.assert_array_equal(reloaded.gram[name], value)


def test_chunks_keep_order_and_fit_the_budget() -> None:
    from factorlm.calibration.capture import _chunks
    from factorlm.calibration.targets import Target

    def target(width: int) -> Target:
        return Target(
            weight=f"w{width}", activation=f"a{width}", transpose=False,
            in_features=width, out_features=4,
        )  # fmt: skip

    groups = {(f"a{w}", False): [target(w)] for w in (4, 8, 5, 16)}
    assert _chunks(groups, None, False) == [list(groups)]
    assert _chunks(groups, 10**9, True) == [list(groups)]
    chunks = _chunks(groups, 8 * (16 + 64), False)
    assert [g for c in chunks for g in c] == list(groups)
    assert all(sum(8 * int(g[0][1:]) ** 2 for g in c) <= 8 * 80 or len(c) == 1 for c in chunks)
    assert len(chunks) == 3  # (4, 8) | (5) | (16)
