"""Decoders with a KV cache: the cache carried exactly, greedy decoding equal to transformers',
and the decode latency grid and generation task in the benchmark report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import factorlm
from factorlm.bench.decode import (
    DecodePoint,
    decode_grid,
    decoder_layout,
    greedy_generate,
    point_feeds,
    step_feeds,
)
from factorlm.bench.footprint import engine_size
from factorlm.bench.run import run_benchmark
from factorlm.bench.runners import load_runner
from factorlm.errors import ConfigError
from factorlm.options import BenchOptions

sys.path.insert(0, str(Path(__file__).parent))

from decoder_models import PROMPTS, tiny_llama

TASK = "text-generation-with-past"


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random 2-layer Llama (hidden 64, vocab 256) exported once with past: hf/ and onnx/."""
    from factorlm.exporters.hf import export

    root = tmp_path_factory.mktemp("tiny_decoder")
    tiny_llama(root / "hf")
    export(root / "hf", root / "onnx", task=TASK, progress=False)
    return {"hf": root / "hf", "onnx": root / "onnx"}


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("decoder_data") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def test_decode_steps_after_a_prefill_equal_one_prefill(tiny_decoder: dict[str, Path]) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 256, size=(2, 14))
    with load_runner(tiny_decoder["onnx"]) as runner:
        layout = decoder_layout(runner.inputs, runner.outputs)
        assert layout is not None and len(layout.past) == 4  # 2 layers x key, value
        full = runner.infer(
            step_feeds(runner.inputs, ids, np.ones_like(ids), layout.empty_cache(2))
        )
        out = runner.infer(
            step_feeds(
                runner.inputs, ids[:, :10], np.ones((2, 10), np.int64), layout.empty_cache(2)
            )
        )
        for k in range(10, 14):  # four decode steps, each carrying the previous step's present.*
            out = runner.infer(
                step_feeds(runner.inputs, ids[:, k : k + 1], np.ones((2, k + 1)), layout.carry(out))
            )
            step, whole = out["logits"][:, 0], full["logits"][:, k]
            assert np.abs(step - whole).max() <= 1e-4 * np.abs(whole).max()
            assert out["present.0.key"].shape[2] == k + 1


def test_positions_follow_the_mask() -> None:
    from factorlm.bench.runners import TensorMeta

    inputs = [
        TensorMeta("input_ids", "int64", ("b", "s")),
        TensorMeta("attention_mask", "int64", ("b", "t")),
        TensorMeta("position_ids", "int64", ("b", "s")),
    ]
    feeds = step_feeds(inputs, np.array([[7]]), np.ones((1, 6)), {})
    assert feeds["position_ids"].tolist() == [[5]]
    feeds = step_feeds(inputs, np.array([[1, 2, 3]]), np.array([[0, 1, 1]]), {})
    assert feeds["position_ids"].tolist() == [[0, 0, 1]]


def test_greedy_generation_equals_transformers_generate(tiny_decoder: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from factorlm._common.text import TextTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_decoder["hf"]).eval()
    tokenizer = TextTokenizer(tiny_decoder["onnx"])
    with load_runner(tiny_decoder["onnx"]) as runner:
        layout = decoder_layout(runner.inputs, runner.outputs)
        assert layout is not None
        for text in PROMPTS:
            prompt = tokenizer.encode(text).tolist()
            ours = greedy_generate(runner, layout, prompt, 24).tokens
            with torch.no_grad():
                theirs = model.generate(
                    torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                    pad_token_id=0,
                )[0, len(prompt) :].tolist()  # fmt: skip
            assert ours == theirs, text
            assert len(set(ours)) > 3  # a real continuation, not one repeated token


def test_generate_api_returns_the_continuations(tiny_decoder: dict[str, Path]) -> None:
    texts = factorlm.generate(tiny_decoder["onnx"], PROMPTS[:2], max_new_tokens=6)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    again = factorlm.generate(tiny_decoder["onnx"] / "model.onnx", PROMPTS[:2], max_new_tokens=6)
    assert again == texts  # greedy: deterministic
    longer = factorlm.generate(
        tiny_decoder["onnx"], PROMPTS[:1], max_new_tokens=12, stop_at_eos=False
    )
    assert longer[0].startswith(texts[0]) and len(longer[0]) > len(texts[0])


def test_generate_refuses_an_encoder(tmp_path: Path) -> None:
    from bench_models import encoder, save_tokenizer

    encoder(tmp_path / "model.onnx")
    save_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="text-generation-with-past"):
        factorlm.generate(tmp_path, ["the film"], max_new_tokens=2)


def test_decode_grid_and_feeds(tiny_decoder: dict[str, Path]) -> None:
    grid = decode_grid((8, 16), (4, 32), (1, 3))
    assert [p.label for p in grid] == [
        "prefill 1x8", "prefill 1x16", "decode 1x1 past 4", "decode 1x1 past 32",
        "decode 3x1 past 4", "decode 3x1 past 32",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="exceed"):
        decode_grid((8,), (300,), (1,), max_positions=256)
    with load_runner(tiny_decoder["onnx"]) as runner:
        layout = decoder_layout(runner.inputs, runner.outputs)
        assert layout is not None
        feeds = point_feeds(
            runner.inputs, layout, DecodePoint("decode", 3, 1, 32), rng=np.random.default_rng(0),
            vocab_size=256,
        )  # fmt: skip
        assert feeds["input_ids"].shape == (3, 1) and feeds["attention_mask"].shape == (3, 33)
        assert feeds["past_key_values.1.value"].shape == (3, 2, 32, 16)
        assert (feeds["position_ids"] == 32).all()
        assert runner.infer(feeds)["present.1.value"].shape == (3, 2, 33, 16)


def test_options_take_comma_lists() -> None:
    opts = BenchOptions(decode_past=("128,512", "1024"), decode_batches=["1", 4])  # type: ignore[arg-type]
    assert opts.decode_past == (128, 512, 1024) and opts.decode_batches == (1, 4)
    with pytest.raises(ConfigError, match="decode_past"):
        BenchOptions(decode_past=(0,))


def test_bench_reports_decode_latency_memory_and_generation(
    tmp_path: Path, tiny_decoder: dict[str, Path], prompts_file: Path
) -> None:
    report = run_benchmark(
        tiny_decoder["onnx"],
        [("same", tiny_decoder["onnx"])],
        data=prompts_file,
        task="generation",
        prefill_lengths=(8, 16),
        decode_past=(16, 32),
        decode_batches=(1, 2),
        max_new_tokens=5,
        generation_prompts=3,
        warmup=1,
        iterations=3,
    )
    data = report.data
    labels = [e["shape"] for e in data["latency"]]
    assert labels == [
        "prefill 1x8", "prefill 1x16", "decode 1x1 past 16", "decode 1x1 past 32",
        "decode 2x1 past 16", "decode 2x1 past 32",
    ]  # fmt: skip
    for entry in data["latency"]:
        assert entry["phase"] in ("prefill", "decode")
        tokens = entry["batch"] * entry["seq"]
        assert entry["tokens"] == tokens
        for res in entry["results"].values():
            assert res["ms_per_token"] == pytest.approx(res["p50_ms"] / tokens)
            assert res["tokens_per_s"] == pytest.approx(1e3 * tokens / res["p50_ms"])
        assert set(entry["speedup"]) == {"same"}
    assert data["settings"]["decode_past"] == [16, 32]
    engines = data["engines"]
    # the graph and its weights (the export writes them to model.onnx_data)
    size = sum(p.stat().st_size for p in tiny_decoder["onnx"].glob("model.onnx*"))
    assert engines[data["reference"]["name"]]["size_bytes"] == size == engines["same"]["size_bytes"]
    memory = engines["same"]["memory"]
    assert memory["probe"] == "decode 2x1 past 32"
    if memory["resident_bytes"] is not None:  # Linux
        assert memory["resident_bytes"] > 0
    task = data["task"]
    assert task["task"] == "generation" and task["candidates"]["same"] == 100.0
    assert task["drop"]["same"] == 0.0
    details = task["details"]
    assert details["prompts"] == 3 and details["max_new_tokens"] == 5
    assert details["first_divergence_mean"]["same"] == 5.0
    assert set(details["tokens_per_s"]) == {data["reference"]["name"], "same"}
    assert len(task["samples"]) == 3
    assert task["samples"][0]["prompt"] == PROMPTS[0]
    assert task["samples"][0]["candidates"]["same"] == task["samples"][0]["reference"]
    files = report.write(tmp_path / "out")
    markdown = files["markdown"].read_text(encoding="utf-8")
    assert "ms/token" in markdown and "tokens/s" in markdown and "Generation samples" in markdown
    page = files["html"].read_text(encoding="utf-8")
    assert "Generation samples" in page and "memory" in page.lower()
    assert json.loads(files["json"].read_text())["task"]["task"] == "generation"


def test_generation_agreement_against_another_model(
    tmp_path: Path, tiny_decoder: dict[str, Path], prompts_file: Path
) -> None:
    """A differently seeded model agrees on few tokens: agreement, divergence, drop add up."""
    from factorlm.exporters.hf import export

    tiny_llama(tmp_path / "hf", seed=1)
    export(tmp_path / "hf", tmp_path / "onnx", task=TASK, progress=False)
    report = run_benchmark(
        tiny_decoder["onnx"], [("other", tmp_path / "onnx")], data=prompts_file,
        task="generation", prefill_lengths=(), decode_past=(8,), decode_batches=(1,),
        max_new_tokens=8, generation_prompts=5, warmup=0, iterations=3,
    )  # fmt: skip
    task = report.data["task"]
    agreement = task["candidates"]["other"]
    assert 0.0 <= agreement < 50.0
    assert task["drop"]["other"] == pytest.approx(100.0 - agreement)
    assert 0.0 <= task["details"]["first_divergence_mean"]["other"] < 8.0
    assert task["details"]["exact_match_rate"]["other"] < 1.0


def test_cli_flags_reach_the_decode_grid(
    tmp_path: Path,
    tiny_decoder: dict[str, Path],
    prompts_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from factorlm.cli import main

    onnx = str(tiny_decoder["onnx"])
    args = ["bench", "-r", onnx, "-c", f"copy={onnx}", "-o", str(tmp_path / "o"), "--no-html",
            "--prefill-lengths", "8", "--decode-past", "8,16", "--decode-batches", "2",
            "--iterations", "3", "--warmup", "0", "--data", str(prompts_file),
            "--task", "generation", "--max-new-tokens", "3", "--generation-prompts", "2"]  # fmt: skip
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line in the captured summary
    capsys.readouterr()
    assert main(args) == 0
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [e["shape"] for e in data["latency"]] == [
        "prefill 1x8", "decode 2x1 past 8", "decode 2x1 past 16",
    ]  # fmt: skip
    assert data["task"]["details"]["prompts"] == 2
    # The console summary reads a decoder per token: ms/token and tokens/s of every row.
    out = capsys.readouterr().out
    assert "ms/token" in out and "tokens/s" in out
    for entry in data["latency"]:
        for name, res in entry["results"].items():
            row = next(line for line in out.splitlines() if entry["shape"] in line and name in line)
            assert f"{res['ms_per_token']:.3f}" in row and f"{res['tokens_per_s']:.1f}" in row
    rates = data["task"]["details"]["tokens_per_s"]
    assert f"copy {rates['copy']:.1f}" in out and "generation tokens/s (end to end)" in out
    assert "first differing token (mean position): copy 3.00" in out
    assert main([*args[:-6], "--decode-past", "0"]) == 2
    assert "--decode-past has '0'" in capsys.readouterr().err


def test_generation_needs_a_decoder_with_past(tmp_path: Path, prompts_file: Path) -> None:
    from bench_models import encoder, save_tokenizer

    encoder(tmp_path / "model.onnx")
    save_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="text-generation-with-past"):
        run_benchmark(tmp_path, [tmp_path], data=prompts_file, task="generation", iterations=3)


def test_engine_size_counts_external_data(tmp_path: Path, tiny_decoder: dict[str, Path]) -> None:
    import onnx

    model = onnx.load(str(tiny_decoder["onnx"] / "model.onnx"))
    onnx.save_model(
        model, str(tmp_path / "model.onnx"), save_as_external_data=True,
        all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0,
    )  # fmt: skip
    size = engine_size(tmp_path / "model.onnx")
    expected = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert size == {"size_bytes": expected, "files": 2}


# --- the real SmolLM2 (slow; skipped unless `factorlm assets smollm` was run) ---------------------


@pytest.fixture(scope="module")
def smollm_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from factorlm.assets import cache_root
    from factorlm.errors import DataError

    try:
        from factorlm.assets import smollm_dir

        source = smollm_dir()
    except DataError:
        pytest.skip("SmolLM2 is not prepared; run `factorlm assets smollm`")
    cached = cache_root() / "onnx" / "SmolLM2-135M-Instruct-with-past"
    if (cached / "model.onnx").is_file():
        return cached
    from factorlm.exporters.hf import export

    out = tmp_path_factory.mktemp("smollm") / "onnx"
    export(source, out, task=TASK, progress=False)
    return out


@pytest.mark.slow
def test_smollm_decode_step_equals_prefill(smollm_onnx: Path) -> None:
    from factorlm._common.text import TextTokenizer

    tokenizer = TextTokenizer(smollm_onnx)
    ids = tokenizer.encode("It is a truth universally acknowledged, that a single man in")[None, :]
    n = ids.shape[1]
    with load_runner(smollm_onnx, intra_op_threads=1) as runner:
        layout = decoder_layout(runner.inputs, runner.outputs)
        assert layout is not None and len(layout.past) == 60  # 30 layers
        full = runner.infer(
            step_feeds(runner.inputs, ids, np.ones_like(ids), layout.empty_cache(1))
        )
        out = runner.infer(
            step_feeds(runner.inputs, ids[:, :-2], np.ones((1, n - 2)), layout.empty_cache(1))
        )
        for k in (n - 2, n - 1):
            out = runner.infer(
                step_feeds(runner.inputs, ids[:, k : k + 1], np.ones((1, k + 1)), layout.carry(out))
            )
            step, whole = out["logits"][0, 0], full["logits"][0, k]
            assert np.abs(step - whole).max() <= 1e-4 * np.abs(whole).max()
    text = factorlm.generate(smollm_onnx, ["The capital of France is"], max_new_tokens=8)[0]
    assert "Paris" in text


def test_perplexity_replays_the_reference_and_generation_never_does(
    tmp_path: Path, tiny_decoder: dict[str, Path], prompts_file: Path
) -> None:
    """A decoder's perplexity windows replay exactly; generation times every engine live."""
    from factorlm.bench.run import record_reference

    common = {"prefill_lengths": (), "decode_past": (8,), "decode_batches": (1,),
              "warmup": 0, "iterations": 3}  # fmt: skip
    ppl = {"task": "perplexity", "window": 8, "max_windows": 3}
    record = tmp_path / "ppl"
    recorded = record_reference(tiny_decoder["onnx"], record, data=prompts_file, **ppl)
    assert recorded["record"]["inferences"] == 3
    ref, cand = tiny_decoder["onnx"], [("same", tiny_decoder["onnx"])]
    live = run_benchmark(ref, cand, data=prompts_file, **ppl, **common).data["task"]
    replayed = run_benchmark(
        ref, cand, data=prompts_file, reference_record=record, **ppl, **common
    ).data["task"]
    assert (replayed["reference_replay"]["replayed"], replayed["reference_replay"]["ran"]) == (3, 0)
    assert replayed["reference"] == live["reference"] == recorded["task"]["reference"]
    assert replayed["candidates"] == live["candidates"]

    gen = {"task": "generation", "max_new_tokens": 4, "generation_prompts": 2}
    record_reference(tiny_decoder["onnx"], tmp_path / "gen", data=prompts_file, **gen)
    task = run_benchmark(
        ref, cand, data=prompts_file, reference_record=tmp_path / "gen", **gen, **common
    ).data["task"]
    assert "reference_replay" not in task and task["details"]["tokens_per_s"]["same"] > 0
