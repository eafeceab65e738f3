"""Sequential, error-correcting calibration on a real exported Llama graph (tiny, random weights).

What must hold: pruning keeps the exposed activations exact; paired statistics of a model with
itself are its Gram; the refit is the optimum of ``‖X W − X̂ M‖`` for the weights whose inputs
are fixed by the earlier blocks; and ``compress(sequential=True)`` writes a valid model whose
logits follow the original.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import factorlm
from factorlm._common.sessions import create_session
from factorlm._common.text import TextTokenizer, find_tokenizer
from factorlm.calibration import collect_statistics, find_targets
from factorlm.calibration.paired import collect_paired_statistics, prune_to_outputs
from factorlm.decompose import corrected_weight, prepared_lowrank, residual_error
from factorlm.errors import ConfigError
from factorlm.sequential import block_order
from tiny_vocab import LONG_TEXTS

TEXTS = LONG_TEXTS * 4


def _data(folder: Path) -> Path:
    path = folder / "calib.json"
    path.write_text(json.dumps([{"text": t} for t in TEXTS]))
    return path


def test_block_order_keeps_shared_inputs_together() -> None:
    names = ["q", "k", "v", "o", "up", "down", "q2", "o2"]
    act = {"q": ("a", False), "k": ("a", False), "v": ("a", False), "o": ("b", False),
           "up": ("c", False), "down": ("d", False), "q2": ("e", False), "o2": ("f", False)}  # fmt: skip
    pos = {n: i for i, n in enumerate(names)}
    groups = block_order(list(reversed(names)), act, pos, 3)
    assert [n for g in groups for n in g] == names  # graph order, nothing lost
    assert len(groups) == 3
    assert any({"q", "k", "v"} <= set(g) for g in groups)
    assert len(block_order(names, act, pos, 50)) == 6  # one group per distinct input at most


def test_pruned_model_gives_the_same_activation(tiny_llama_past: Path) -> None:
    model = onnx.load(str(tiny_llama_past))
    targets = find_targets(model)
    name = targets[len(targets) // 2].activation
    pruned = prune_to_outputs(model, [name])
    assert len(pruned.graph.node) < len(model.graph.node)
    full = onnx.load(str(tiny_llama_past))
    full.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    tok = TextTokenizer(find_tokenizer(tiny_llama_past))
    from factorlm._common.text import batch_feeds

    a = create_session(full.SerializeToString(), graph_optimization_level="basic", what="full")
    b = create_session(pruned.SerializeToString(), graph_optimization_level="basic", what="pruned")
    _, _, feeds = next(batch_feeds(a.get_inputs(), tok, TEXTS[:3], batch_size=3, max_length=16))
    wanted = {i.name for i in b.get_inputs()}
    got = b.run([name], {k: v for k, v in feeds.items() if k in wanted})[0]
    np.testing.assert_array_equal(got, a.run([name], feeds)[0])


def test_paired_statistics_of_a_model_with_itself_are_its_gram(tiny_llama_past: Path) -> None:
    model = onnx.load(str(tiny_llama_past))
    targets = find_targets(model)
    stats = collect_statistics(
        tiny_llama_past, TEXTS, max_length=16, batch_size=4, cache_dir=None, progress=False
    )
    tok = TextTokenizer(find_tokenizer(tiny_llama_past))
    keys = [(t.activation, t.transpose) for t in targets]
    paired = collect_paired_statistics(model, model, TEXTS, tok, keys, max_length=16, batch_size=4)
    for t in targets:
        grams = paired[(t.activation, t.transpose)]
        assert grams.tokens == stats.tokens
        np.testing.assert_allclose(grams.gram_hat, stats.gram[t.weight], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(grams.cross, stats.gram[t.weight], rtol=1e-9, atol=1e-9)


def test_sequential_compress_refits_and_runs(tiny_llama_past: Path, tmp_path: Path) -> None:
    data = _data(tmp_path)
    common = dict(method="whiten", ratio=0.5, joint_qkv=False, rank_multiple=4, min_size=256,
                  calibration_samples=len(TEXTS), max_length=16, batch_size=4, allocation="uniform")  # fmt: skip
    plain = factorlm.compress(
        tiny_llama_past, tmp_path / "plain" / "model.onnx", data=data, **common
    )
    seq = factorlm.compress(
        tiny_llama_past, tmp_path / "seq" / "model.onnx", data=data, sequential=True,
        sequential_blocks=2, **common,
    )  # fmt: skip
    assert seq.factorized == plain.factorized > 0
    assert seq.params_after == plain.params_after
    onnx.checker.check_model(str(tmp_path / "seq" / "model.onnx"), full_check=True)

    # The weights that read layer 1's first input see the same X̂ in both models (layer 0 is
    # refit identically: the first block needs no correction), so there the sequential factors
    # must be the exact optimum of ‖X W − X̂ M‖, never worse than fitting to X.
    model = onnx.load(str(tiny_llama_past))
    targets = find_targets(model)
    layer1 = [t for t in targets if "layers.1" in t.activation]
    first = [t for t in layer1 if t.activation == layer1[0].activation]
    assert first and all(t.weight in seq.plan.weights for t in first)
    compressed = onnx.load(str(tmp_path / "seq" / "model.onnx"))
    tok = TextTokenizer(find_tokenizer(tiny_llama_past))
    key = (first[0].activation, first[0].transpose)
    grams = collect_paired_statistics(
        model, compressed, TEXTS, tok, [key], max_length=16, batch_size=4
    )[key]
    stats = collect_statistics(tiny_llama_past, TEXTS, max_length=16, batch_size=4, progress=False)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    improved = 0
    for t in first:
        w = inits[t.weight].astype(np.float64)
        rank = int(seq.plan.weights[t.weight].rank or 0)
        ours = prepared_lowrank(
            corrected_weight(w, grams.gram_hat, grams.cross), "whiten", rank, gram=grams.gram_hat
        ).reconstruct()
        theirs = prepared_lowrank(w, "whiten", rank, gram=stats.gram[t.weight]).reconstruct()
        g = stats.gram[t.weight]
        e_ours = residual_error(w, ours, g, grams.gram_hat, grams.cross)
        e_theirs = residual_error(w, theirs, g, grams.gram_hat, grams.cross)
        assert e_ours <= e_theirs * (1 + 1e-6)
        improved += e_ours < e_theirs * (1 - 1e-3)
    assert improved >= 1

    # The written model runs and stays close to the original's next-token distribution.
    def logits(path: Path) -> np.ndarray:
        from factorlm._common.text import batch_feeds

        s = create_session(path, what=str(path))
        _, _, feeds = next(batch_feeds(s.get_inputs(), tok, TEXTS[:4], batch_size=4, max_length=16))
        return np.asarray(s.run(["logits"], feeds)[0])

    out = logits(tmp_path / "seq" / "model.onnx")
    assert np.isfinite(out).all()
    assert out.shape == logits(tiny_llama_past).shape


def test_sequential_needs_data_and_whitening(tiny_llama_past: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the calibration texts"):
        factorlm.compress(tiny_llama_past, tmp_path / "a.onnx", sequential=True, stats=None)
    with pytest.raises(ConfigError, match="use method whiten"):
        factorlm.compress(tiny_llama_past, tmp_path / "b.onnx", method="svd", sequential=True)
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()
