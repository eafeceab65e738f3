"""One tokenization path: calibration and the benchmark feed the model identical ids and feeds."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from factorlm._common.text import TextTokenizer, find_tokenizer, text_feeds
from factorlm.errors import DataError, ModelLoadError

MINILM = Path.home() / ".cache" / "factorlm" / "models" / "all-MiniLM-L6-v2"
TEXTS = [
    "The film is a good movie.",
    "Bad plot",
    "Ève's café: naïve CAFÉ déjà-vu, 3.14 – “quoted” — emoji 🙂 and 漢字.",
    "a very long review " * 20,  # truncated at max_length, [SEP] kept
    "  leading and trailing spaces  ",
    "x",
    "Another line\twith a tab",
]
BATCH, MAX_LENGTH = 3, 24
#: The benchmark embeds texts sorted by length (less padding); calibration takes them in order.
BY_LENGTH = sorted(TEXTS, key=len)


def _minilm_like_model(folder: Path, vocab: int) -> Path:
    """ids, mask and token types in (as MiniLM exports them); one MatMul for calibration."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, 8)).astype(np.float32), "emb"),
        numpy_helper.from_array(rng.standard_normal((2, 8)).astype(np.float32), "types"),
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["E"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["T"]),
        helper.make_node("Add", ["E", "T"], ["S"]),
        helper.make_node("Cast", ["attention_mask"], ["M"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["M", "axes"], ["M3"]),
        helper.make_node("Mul", ["S", "M3"], ["X"]),
        helper.make_node("MatMul", ["X", "w"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "minilm_like",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, ["b", "s"])
            for name in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def minilm_folder(tmp_path: Path) -> Path:
    if not (MINILM / "tokenizer.json").is_file():
        pytest.skip(f"the MiniLM tokenizer is not in {MINILM} (factorlm assets minilm)")
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (MINILM / name).is_file():
            shutil.copy(MINILM / name, folder / name)
    _minilm_like_model(folder, TextTokenizer(folder)._fast.get_vocab_size())
    return folder


def _calibration_feeds(
    model: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> list[dict[str, np.ndarray]]:
    """Every feed ``collect_statistics`` gives ONNX Runtime, recorded at the session."""
    from factorlm.calibration import capture

    seen: list[dict[str, np.ndarray]] = []
    real = capture._instrumented_session

    class Recorder:
        def __init__(self, session: Any) -> None:
            self.session = session

        def __getattr__(self, name: str) -> Any:
            return getattr(self.session, name)

        def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
            seen.append({k: v.copy() for k, v in feeds.items()})
            return self.session.run(names, feeds)

    monkeypatch.setattr(capture, "_instrumented_session", lambda *a: Recorder(real(*a)))
    capture.collect_statistics(
        model, BY_LENGTH, batch_size=BATCH, max_length=MAX_LENGTH, cache_dir=cache, progress=False
    )
    return seen


def _benchmark_feeds(model: Path) -> list[dict[str, np.ndarray]]:
    """Every feed the benchmark's classification/similarity tasks give the runner."""
    from factorlm._common.text import TextTokenizer, find_tokenizer
    from factorlm.bench.runners import OrtRunner
    from factorlm.bench.tasks import embed_texts

    seen: list[dict[str, np.ndarray]] = []

    class Recording(OrtRunner):
        def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            seen.append({k: v.copy() for k, v in feeds.items()})
            return super().infer(feeds)

    tokenizer = TextTokenizer(find_tokenizer(None, model.parent))
    with Recording(model, name="ref") as runner:
        embed_texts([runner], tokenizer, BY_LENGTH, batch_size=BATCH, max_length=MAX_LENGTH)
    return seen


def test_calibration_and_benchmark_feed_identical_tokens(
    minilm_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = minilm_folder / "model.onnx"
    calibration = _calibration_feeds(model, tmp_path / "cache", monkeypatch)
    benchmark = _benchmark_feeds(model)
    assert len(calibration) == len(benchmark) == 3  # 7 texts in batches of 3
    for cal, bench in zip(calibration, benchmark, strict=True):
        assert sorted(cal) == sorted(bench) == ["attention_mask", "input_ids", "token_type_ids"]
        for name in cal:
            assert cal[name].dtype == bench[name].dtype == np.int64
            np.testing.assert_array_equal(cal[name], bench[name])
    # The long text is truncated to MAX_LENGTH with [SEP] (id 102) kept last.
    assert benchmark[-1]["input_ids"].shape[1] == MAX_LENGTH
    assert benchmark[-1]["input_ids"][-1, -1] == 102

    # The same ids transformers gives (the benchmark's tokenizer before the paths merged).
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(minilm_folder))
    for start, bench in zip(range(0, len(BY_LENGTH), BATCH), benchmark, strict=True):
        enc = hf(
            BY_LENGTH[start : start + BATCH], padding=True, truncation=True,
            max_length=MAX_LENGTH, return_tensors="np",
        )  # fmt: skip
        np.testing.assert_array_equal(enc["input_ids"], bench["input_ids"])
        np.testing.assert_array_equal(enc["attention_mask"], bench["attention_mask"])
    long_text = " ".join(TEXTS) * 30  # perplexity: the whole text, no truncation
    ids = TextTokenizer(minilm_folder).encode(long_text)
    assert ids.size > 512
    np.testing.assert_array_equal(ids, hf(long_text)["input_ids"])


def test_find_tokenizer_prefers_explicit_then_first_folder(
    tmp_path: Path, minilm_folder: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_tokenizer(None, empty, minilm_folder / "model.onnx") == minilm_folder
    assert find_tokenizer(empty, explicit=minilm_folder / "tokenizer.json") == minilm_folder
    with pytest.raises(DataError, match=r"No tokenizer found in .*empty"):
        find_tokenizer(minilm_folder, explicit=empty)
    with pytest.raises(DataError, match="pass the tokenizer folder"):
        find_tokenizer(empty, None)


def test_feeds_for_decoder_inputs() -> None:
    """Positions follow the mask, the KV cache is empty, types follow each input's dtype."""
    ort_like = [
        SimpleNamespace(name="input_ids", type="tensor(int32)", shape=["b", "s"]),
        SimpleNamespace(name="attention_mask", type="tensor(int64)", shape=["b", "s"]),
        SimpleNamespace(name="position_ids", type="tensor(int64)", shape=["b", "s"]),
        SimpleNamespace(
            name="past_key_values.0.key", type="tensor(float16)", shape=["b", 4, "p", 16]
        ),
        SimpleNamespace(name="use_cache_branch", type="tensor(bool)", shape=[1]),
    ]
    ids = np.array([[5, 6, 7], [8, 9, 0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    feeds = text_feeds(ort_like, {"input_ids": ids, "attention_mask": mask})
    assert feeds["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(feeds["position_ids"], [[0, 1, 2], [0, 1, 1]])
    past = feeds["past_key_values.0.key"]
    assert past.shape == (2, 4, 0, 16) and past.dtype == np.float16
    assert feeds["use_cache_branch"].tolist() == [False]
    with pytest.raises(ModelLoadError, match="no static head shape"):
        text_feeds(
            [
                SimpleNamespace(
                    name="past_key_values.0.value", type="tensor(float)", shape=["b", "h", "p", 16]
                )
            ],
            {"input_ids": ids, "attention_mask": mask},
        )
    with pytest.raises(ModelLoadError, match="cannot feed from text"):
        text_feeds(
            [SimpleNamespace(name="pixel_values", type="tensor(float)", shape=["b", 3])],
            {"input_ids": ids, "attention_mask": mask},
        )


def test_embeddings_come_back_in_the_texts_order(minilm_folder: Path) -> None:
    """The benchmark batches texts by length; each vector must still be its own text's."""
    from factorlm._common.text import TextTokenizer, find_tokenizer
    from factorlm.bench.runners import OrtRunner
    from factorlm.bench.tasks import embed_texts

    model = minilm_folder / "model.onnx"
    tokenizer = TextTokenizer(find_tokenizer(None, model.parent))
    with OrtRunner(model, name="ref") as runner:
        (batched,), _ = embed_texts([runner], tokenizer, TEXTS, batch_size=BATCH)
        alone = [embed_texts([runner], tokenizer, [t], batch_size=1)[0][0][0] for t in TEXTS]
    np.testing.assert_allclose(batched, np.stack(alone), rtol=1e-4, atol=1e-5)
