"""A decoder's token embedding and the LM head tied to it share one low-rank factorization.

On optimum's Llama export (SmolLM2, and a tiny tied Llama) the head reads the embedding through
a Transpose: ``logits = h @ Transpose(E)``. Factorized as ``E ≈ P Q``, the lookup becomes
``Gather(P, ids) @ Q`` and the head ``h @ Qᵀ @ Pᵀ``; both read the same two initializers.

Checked on the exported graphs, run in ONNX Runtime with their KV-cache inputs:
- exact factors (full rank) give the original logits;
- truncated factors move every looked-up embedding row by at most ``σ_{r+1}`` and every head
  logit row by at most ``‖h‖·σ_{r+1}`` (Eckart–Young: ``‖E - P Q‖₂ = σ_{r+1}``), measured on the
  compressed graph's own activations;
- the output passes the full ONNX checker, a decode step after a prefill equals one prefill of
  the whole sequence, and the parameter count drops by exactly what the plan says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from factorlm.bench.decode import decoder_layout, step_feeds
from factorlm.bench.runners import load_runner
from factorlm.compression import compress
from factorlm.decompose import prepared_lowrank
from factorlm.io import load_model, save_model
from factorlm.passes import Candidate, LowRankEmbeddingPass, RemoveReplacedWeightsPass, analyze

SMOLLM_EMBEDDING = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def smollm_onnx() -> Path:
    """The SmolLM2-135M export with past from the asset cache (skipped when not prepared)."""
    from factorlm.assets import cache_root

    path = cache_root() / "onnx" / "SmolLM2-135M-Instruct-with-past" / "model.onnx"
    if not path.is_file():
        pytest.skip("SmolLM2 is not exported; run benchmarks/quality.py --model smollm once")
    return path


@pytest.fixture(params=["tiny", pytest.param("smollm", marks=pytest.mark.slow)])
def decoder(request: pytest.FixtureRequest) -> Path:
    """model.onnx of a decoder exported with past whose LM head is tied to the embedding."""
    fixture = "tiny_llama_past" if request.param == "tiny" else "smollm_onnx"
    return Path(request.getfixturevalue(fixture))


def _tied(model: ir.Model) -> Candidate:
    (cand,) = [c for c in analyze(model).candidates if c.kind == "embedding"]
    return cand


def _names(cand: Candidate) -> dict[str, str]:
    """The lookup's output, the head's input and the logits: names the rewrite keeps."""
    gather = next(u for u in cand.uses if u.form == "gather").node
    head = next(u for u in cand.uses if u.form == "x@Wt").node
    return {
        "embedded": gather.outputs[0].name or "",
        "hidden": head.inputs[0].name or "",  # type: ignore[union-attr]
        "logits": head.outputs[0].name or "",
    }


def _probe(path: Path, names: dict[str, str], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Run one prefill of ``ids`` (empty cache) with ``names`` exposed as outputs."""
    proto = onnx.load(str(path))
    present = {o.name for o in proto.graph.output}
    for name in names.values():
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    del proto
    n = ids.shape[1]
    feeds: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(n, dtype=np.int64)[None, :],
    }
    for meta in session.get_inputs():
        if meta.name.startswith("past_key_values"):
            _, heads, _, dim = meta.shape
            feeds[meta.name] = np.zeros((1, heads, 0, dim), np.float32)
    wanted = list(names.values())
    return dict(zip(names, session.run(wanted, feeds), strict=True))


def _ids(vocab: int, n: int = 12) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (1, n), dtype=np.int64)


def _decode_matches_prefill(path: Path, ids: np.ndarray) -> None:
    """Prefill n-2 tokens, decode the last two one by one: the logits of one full prefill."""
    n = ids.shape[1]
    with load_runner(path, intra_op_threads=1) as runner:
        layout = decoder_layout(runner.inputs, runner.outputs)
        assert layout is not None
        full = runner.infer(step_feeds(runner.inputs, ids, np.ones((1, n)), layout.empty_cache(1)))
        out = runner.infer(
            step_feeds(runner.inputs, ids[:, :-2], np.ones((1, n - 2)), layout.empty_cache(1))
        )
        for k in (n - 2, n - 1):
            feeds = step_feeds(
                runner.inputs, ids[:, k : k + 1], np.ones((1, k + 1)), layout.carry(out)
            )
            out = runner.infer(feeds)
            step, whole = out[layout.logits][0, 0], full[layout.logits][0, k]
            assert np.abs(step - whole).max() <= 1e-4 * np.abs(whole).max()


def _param_count(path: Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer)


def test_the_head_reads_the_embedding_through_a_transpose(decoder: Path) -> None:
    cand = _tied(load_model(decoder))
    assert [u.form for u in cand.uses] == ["gather", "x@Wt"]
    assert cand.uses[1].via is not None and cand.uses[1].via.op_type == "Transpose"
    # The core is the head's matrix Eᵀ (in = hidden width), so the head's statistics apply.
    vocab, d = cand.stored_shape
    assert cand.transposed and cand.shape == (d, vocab)
    if decoder.parent.name.startswith("SmolLM2"):
        assert cand.name == SMOLLM_EMBEDDING and cand.stored_shape == (49152, 576)


def test_exact_shared_factors_give_the_original_logits(decoder: Path, tmp_path: Path) -> None:
    """Full-rank factors through the rewrite: the same logits, prefill and decode steps."""
    model = load_model(decoder)
    cand = _tied(model)
    names = _names(cand)
    vocab, d = cand.stored_shape
    full = min(vocab, d)  # the tiny model's vocabulary is smaller than its width
    factors = prepared_lowrank(cand.matrix(), "svd", full)  # E = P Q up to rounding
    ir.passes.PassManager(
        [LowRankEmbeddingPass({cand.name: factors}), RemoveReplacedWeightsPass([cand.name])]
    )(model)
    out = tmp_path / "model.onnx"
    save_model(model, out)  # full checker with strict shape inference
    onnx.checker.check_model(str(out), full_check=True)
    rewritten = onnx.load(str(out), load_external_data=False)
    inits = {t.name for t in rewritten.graph.initializer}
    assert cand.name not in inits
    left, right = f"{cand.name}.factorlm_left", f"{cand.name}.factorlm_right"
    assert {left, right} <= inits
    readers = {n.op_type for n in rewritten.graph.node if left in n.input or right in n.input}
    assert readers == {"Gather", "MatMul", "Transpose"}  # lookup and head share P and Q
    ids = _ids(vocab)
    ref = _probe(decoder, names, ids)["logits"]
    got = _probe(out, names, ids)["logits"]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    _decode_matches_prefill(out, ids)


def test_truncated_shared_factors_stay_within_the_truncation(decoder: Path, tmp_path: Path) -> None:
    """compress --embeddings at a high rank: errors bounded by σ_{r+1}, params as planned."""
    cand = _tied(load_model(decoder))
    names = _names(cand)
    vocab, d = cand.stored_shape
    out = tmp_path / "model.onnx"
    result = compress(
        decoder, out, method="svd", ratio=0.9, embeddings=0.9, include="embed",
        rank_multiple=8, min_size=0,
    )  # fmt: skip
    entry = result.plan.weights[cand.name]
    assert list(result.plan.weights) == [cand.name] and entry.kind == "embedding"
    rank = int(entry.rank or 0)
    assert 0 < rank < min(vocab, d)
    assert entry.params_after == rank * (vocab + d)
    assert entry.flops_before == 2 * vocab * d  # the head; a lookup costs nothing
    assert entry.flops_after == 2 * rank * (vocab + d) + 2 * rank * d
    onnx.checker.check_model(str(out), full_check=True)
    before, after = _param_count(decoder), _param_count(out)
    assert before - after == entry.params_before - entry.params_after
    assert (result.model_params_before, result.model_params_after) == (before, after)

    embedding = cand.stored().astype(np.float64)
    sigma = np.linalg.svd(embedding, compute_uv=False)
    bound = sigma[rank]  # ‖E - P Q‖₂ of the best rank-r factors
    assert entry.expected_error == pytest.approx(
        np.sqrt((sigma[rank:] ** 2).sum() / (sigma**2).sum()), rel=1e-6
    )
    ids = _ids(vocab)
    got = _probe(out, names, ids)
    rows = got["embedded"][0].astype(np.float64) - embedding[ids[0]]
    assert np.linalg.norm(rows, axis=1).max() <= bound * (1 + 1e-3) + 1e-5
    hidden = got["hidden"][0].astype(np.float64)
    exact = hidden @ embedding.T  # the dense head on the compressed graph's own hidden states
    error = np.linalg.norm(got["logits"][0] - exact, axis=1)
    assert np.all(error <= np.linalg.norm(hidden, axis=1) * bound * (1 + 1e-3) + 1e-4)
    assert error.max() > 0  # truncated: the head did change
    _decode_matches_prefill(out, ids)


def test_whiten_fits_the_shared_factors_to_the_head_s_inputs_and_lookups(
    tiny_llama_past: Path, tmp_path: Path
) -> None:
    """Calibration records, under the embedding's name, the Gram ``C`` of the head's input and
    how often each token was looked up (``n``); ``compress(method="whiten")`` factorizes the tied
    pair to minimise ``Σ_i (n_i + 1) · Δ_i C Δ_iᵀ`` (``Δ = E - P Q``, row i = token i): the
    logits' error on the calibration inputs, counted per looked-up row. Lower than plain SVD's
    there, higher in plain Frobenius norm (each is optimal for its own); both outputs decode."""
    from factorlm._common.text import TextTokenizer
    from factorlm.calibration import CalibrationStats, collect_statistics
    from tiny_vocab import WORDS

    decoder = tiny_llama_past
    cand = _tied(load_model(decoder))
    vocab, d = cand.stored_shape
    rng = np.random.default_rng(3)
    texts = [" ".join(rng.choice(WORDS[:12], 90)) for _ in range(6)]  # a skewed vocabulary
    stats = collect_statistics(
        decoder, texts, max_length=100, batch_size=2, cache_dir=tmp_path / "cache", progress=False
    )
    gram, counts = stats.gram[cand.name], stats.token_counts[cand.name]
    tokenizer, names = TextTokenizer(decoder.parent), _names(cand)
    ids = [tokenizer.encode(t) for t in texts]
    assert np.array_equal(counts, np.bincount(np.concatenate(ids), minlength=vocab))
    assert 0 < np.count_nonzero(counts) < vocab
    runs = [_probe(decoder, names, row[None, :]) for row in ids]
    hidden = np.concatenate([run["hidden"][0] for run in runs]).astype(np.float64)
    assert gram.shape == (d, d)
    assert gram == pytest.approx(hidden.T @ hidden, rel=1e-4, abs=1e-6 * np.abs(gram).max())
    (cached,) = (tmp_path / "cache").glob("stats-*.npz")
    assert np.array_equal(CalibrationStats.load(cached).token_counts[cand.name], counts)

    weight = cand.stored().astype(np.float64)
    rows = counts + 1.0

    def objective(delta: np.ndarray) -> float:
        return float(np.einsum("i,ij,jk,ik->", rows, delta, gram, delta))

    errors = {}
    for method in ("whiten", "svd"):
        out = tmp_path / method / "model.onnx"
        result = compress(
            decoder, out, method=method, ratio=0.9, embeddings=0.6, include="embed",
            rank_multiple=4, min_size=0, stats=stats,
        )  # fmt: skip
        entry = result.plan.weights[cand.name]
        assert entry.method == method and entry.rank == int(0.6 * vocab * d / (vocab + d)) // 4 * 4
        inits = {
            t.name: onnx.numpy_helper.to_array(t)
            for t in onnx.load(str(out)).graph.initializer
            if t.name.startswith(cand.name)
        }
        delta = weight - inits[f"{cand.name}.factorlm_left"] @ inits[f"{cand.name}.factorlm_right"]
        errors[method] = (objective(delta), np.linalg.norm(delta))
        # The plan's expected error, relative: of that objective (whiten), of E (svd).
        expected = (
            np.sqrt(errors[method][0] / objective(weight))
            if method == "whiten"
            else errors[method][1] / np.linalg.norm(weight)
        )
        assert entry.expected_error == pytest.approx(expected, rel=1e-3)
        _decode_matches_prefill(out, _ids(vocab))
    assert errors["whiten"][0] < 0.9 * errors["svd"][0]
    assert errors["whiten"][1] > errors["svd"][1]
