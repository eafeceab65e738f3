"""collect_output_fisher / output_fisher against hand-derived and per-sample autograd gradients."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from factorlm.calibration import collect_output_fisher, find_targets
from factorlm.calibration.fisher import output_fisher

DATA = [
    ("the film is a good movie", "pos"),
    ("bad plot and awful actor", "neg"),
    ("great funny clever story", "pos"),
    ("boring long worst movie", "neg"),
    ("the best quiet film", "pos"),
]
TEXTS = ["the film is a good movie", "a bad plot", "the story is funny and clever and long"]


def _output_grads(model: Any, names: set[str], loss: Callable[[], Any]) -> dict[str, np.ndarray]:
    """Σ over the first axes of (∂loss/∂y)² for the linear modules ``names`` (weight names),
    by keeping their outputs and asking ``torch.autograd.grad`` directly (one unpadded sample)."""
    import torch

    outputs: dict[str, Any] = {}
    hooks = [
        module.register_forward_hook(
            lambda m, a, out, n=f"{name}.weight": outputs.__setitem__(n, out)
        )
        for name, module in model.named_modules()
        if f"{name}.weight" in names
    ]
    try:
        value = loss()
    finally:
        for hook in hooks:
            hook.remove()
    keys = sorted(outputs)
    grads = torch.autograd.grad(value, [outputs[k] for k in keys], allow_unused=True)
    result = {}
    for key, grad in zip(keys, grads, strict=True):
        width = outputs[key].shape[-1]
        g = np.zeros(width) if grad is None else grad.double().reshape(-1, width).square().sum(0)
        result[key] = np.asarray(g)
    return result


class _Tiny:
    """Two token-wise linear layers and a head on the mean over tokens, with a hand-made loss."""

    def __init__(self) -> None:
        import torch

        torch.manual_seed(0)
        self.module = torch.nn.ModuleDict(
            {
                "fc1": torch.nn.Linear(3, 4),
                "fc2": torch.nn.Linear(4, 2),
                "head": torch.nn.Linear(4, 1),
            }
        )

    def loss(self, index: int, batch: Mapping[str, Any]) -> Any:
        """0.5 Σ_tokens ‖fc2(h) − t‖² (padding included on purpose) + Σ_b head(mean_t h)²."""
        m = self.module
        h = m["fc1"](batch["x"]).tanh()
        y = m["fc2"](h)
        z = m["head"](h.mean(1))
        return 0.5 * ((y - batch["t"]) ** 2).sum() + (z**2).sum()


def test_output_fisher_equals_hand_derived_gradients() -> None:
    import torch

    tiny = _Tiny()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 3)).astype(np.float32)
    t = rng.standard_normal((2, 3, 2)).astype(np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    batch = {
        "x": torch.from_numpy(x),
        "t": torch.from_numpy(t),
        "attention_mask": torch.tensor(mask),
    }
    g = output_fisher(tiny.module, [batch], tiny.loss)

    p = {k: v.detach().double().numpy() for k, v in tiny.module.named_parameters()}
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    h = np.tanh(x64 @ p["fc1.weight"].T + p["fc1.bias"])
    y = h @ p["fc2.weight"].T + p["fc2.bias"]
    z = h.mean(1) @ p["head.weight"].T + p["head.bias"]
    dz = 2 * z  # (batch, 1)
    dy = y - t64  # (batch, tokens, 2)
    dh = dy @ p["fc2.weight"] + (dz @ p["head.weight"])[:, None, :] / x.shape[1]
    d1 = dh * (1 - h**2)
    keep = mask[..., None]
    np.testing.assert_allclose(g["fc2.weight"], (keep * dy**2).sum((0, 1)), rtol=1e-5)
    np.testing.assert_allclose(g["fc1.weight"], (keep * d1**2).sum((0, 1)), rtol=1e-5)
    np.testing.assert_allclose(g["head.weight"], (dz**2).sum(0), rtol=1e-5)  # not per token
    assert all(v.dtype == np.float64 for v in g.values())
    # Weights stay frozen only during the call: no gradient was stored, flags restored.
    assert all(q.requires_grad and q.grad is None for q in tiny.module.parameters())

    only = output_fisher(tiny.module, [batch], tiny.loss, weights={"fc2.weight"})
    assert set(only) == {"fc2.weight"}
    np.testing.assert_allclose(only["fc2.weight"], g["fc2.weight"], rtol=1e-12)


def test_lm_output_fisher_sums_tokens_and_ignores_padding(
    tiny_llama_dir: Path, tiny_llama_past: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batched = collect_output_fisher(
        tiny_llama_dir, tiny_llama_past, TEXTS, batch_size=3, cache_dir=tmp_path, progress=False
    )
    proto = onnx.load(str(tiny_llama_past))
    targets = {t.weight: t for t in find_targets(proto)}
    assert set(batched) == set(targets) and len(batched) == 14  # 2 layers x q/k/v/o/gate/up/down
    for name, values in batched.items():
        assert values.shape == (targets[name].out_features,) and values.dtype == np.float64
        assert np.all(np.isfinite(values)) and np.all(values >= 0) and values.sum() > 0

    # One text at a time (no padding) gives the same sums: padding adds nothing, batching is exact.
    alone = collect_output_fisher(
        tiny_llama_dir, tiny_llama_past, TEXTS, batch_size=1, cache_dir=tmp_path, progress=False
    )
    for name in batched:
        np.testing.assert_allclose(batched[name], alone[name], rtol=1e-6)

    # And equals Σ_texts Σ_tokens (∂L/∂y)² with L the HF next-token loss times its token count.
    from factorlm.calibration.fisher import map_to_onnx

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    params = {n: q.detach().numpy() for n, q in model.named_parameters() if q.ndim == 2}
    mapping = {init: param for init, (param, _) in map_to_onnx(proto, params).items()}
    assert set(mapping) == set(batched)
    expected = {param: 0.0 for param in mapping.values()}
    for text in TEXTS:
        enc = tok([text], return_tensors="pt")
        n = enc["input_ids"].shape[1]

        def loss(enc: Any = enc, n: int = n) -> Any:
            return model(**enc, labels=enc["input_ids"]).loss * (n - 1)

        for param, value in _output_grads(model, set(mapping.values()), loss).items():
            expected[param] = expected[param] + value
    for init, param in mapping.items():
        np.testing.assert_allclose(batched[init], expected[param], rtol=1e-5, atol=1e-12)

    # Cached: a second call reads the outfisher-*.npz and gives identical arrays.
    assert len(list(tmp_path.glob("outfisher-*.npz"))) == 2
    again = collect_output_fisher(
        tiny_llama_dir, tiny_llama_past, TEXTS, batch_size=3, cache_dir=tmp_path, progress=False
    )
    assert set(again) == set(batched)
    for name in batched:
        np.testing.assert_array_equal(again[name], batched[name])


def test_classification_output_fisher_matches_softmax_residuals(
    tiny_bert_dir: Path, tiny_bert_onnx: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in DATA))
    onnx_path, names = tiny_bert_onnx
    g = collect_output_fisher(
        tiny_bert_dir, onnx_path, data, batch_size=2, cache_dir=tmp_path, progress=False
    )
    assert set(g) == set(names)

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    expected = {p: 0.0 for p in names.values()}
    residual = np.zeros(2)
    for text, label in DATA:
        enc = tok([text], return_tensors="pt")
        y = torch.tensor([model.config.label2id[label]])

        def loss(enc: Any = enc, y: Any = y) -> Any:
            return torch.nn.functional.cross_entropy(model(**enc).logits, y)

        for param, value in _output_grads(model, set(names.values()), loss).items():
            expected[param] = expected[param] + value
        with torch.no_grad():
            probs = torch.softmax(model(**enc).logits, -1).double().numpy()[0]
        residual += (probs - np.eye(2)[int(y)]) ** 2  # ∂CE/∂logits = softmax − one-hot
    for init, param in names.items():
        np.testing.assert_allclose(g[init], expected[param], rtol=1e-5, atol=1e-12)
    head = next(init for init, param in names.items() if param == "classifier.weight")
    np.testing.assert_allclose(g[head], residual, rtol=1e-5)


def _embedding_jacobian_squares(model_dir: Path, names: set[str]) -> dict[str, np.ndarray]:
    """Σ_texts Σ_tokens Σ_k (∂e_k/∂y)² of the mean-pooled embedding e, one text and one k at a
    time with autograd (no padding, no probes): the exact value the embedding task estimates."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    total = {name: 0.0 for name in names}
    for text in TEXTS:
        enc = tok([text], return_tensors="pt")
        for k in range(model.config.hidden_size):

            def loss(enc: Any = enc, k: int = k) -> Any:
                return model(**enc).last_hidden_state[0, :, k].mean()

            for name, value in _output_grads(model, names, loss).items():
                total[name] = total[name] + value
    return {name: np.asarray(value) for name, value in total.items()}


def test_embedding_output_fisher_is_exact_with_a_basis_and_converges_with_probes(
    tiny_bert_dir: Path, tiny_bert_onnx: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    onnx_path, names = tiny_bert_onnx
    # The encoder alone: the classifier does not reach e; the pooler maps but gets exactly 0.
    encoder = {  # the classifier's "bert." prefix is not in the bare encoder's names
        init: param.removeprefix("bert.")
        for init, param in names.items()
        if param != "classifier.weight"
    }
    exact = _embedding_jacobian_squares(tiny_bert_dir, set(encoder.values()))
    hidden = 16

    def collect(probes: int | np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
        return collect_output_fisher(
            tiny_bert_dir, onnx_path, TEXTS, task="embedding", probes=probes, seed=seed,
            batch_size=2, cache_dir=tmp_path, progress=False,
        )  # fmt: skip

    # Orthonormal probes spanning the embedding (the identity, then a random rotation): exact.
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((hidden, hidden)))
    for basis in (np.eye(hidden), q.T):
        g = collect(basis)
        assert set(g) == set(encoder)
        for init, param in encoder.items():
            np.testing.assert_allclose(g[init], exact[param], rtol=1e-4, atol=1e-9)
    pooler = next(init for init, param in encoder.items() if param.startswith("pooler."))
    assert not g[pooler].any() and all(g[i].sum() > 0 for i in encoder if i != pooler)
    # A basis that does not span the embedding misses the rest: the check can fail.
    half = collect(np.eye(hidden)[: hidden // 2])
    assert sum(half[i].sum() for i in encoder) < 0.9 * sum(exact[p].sum() for p in encoder.values())

    # Seeded Gaussian probes: unbiased, the error shrinks with more probes (~1/√probes).
    flat = np.concatenate([exact[p] for p in encoder.values()])

    def error(probes: int, seed: int = 0) -> float:
        est = collect(probes, seed)
        return float(np.linalg.norm(np.concatenate([est[i] for i in encoder]) - flat)) / float(
            np.linalg.norm(flat)
        )

    few, many = error(4), error(256)  # measured 0.32 and 0.044 (seed 0)
    assert many < 0.1 and few > 3 * many, (few, many)
    assert error(4, seed=1) != few  # the seed is part of the cache key and of the draw


def test_embedding_weight_fisher_sums_probe_gradients(
    tiny_bert_dir: Path, tiny_bert_onnx: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """collect_fisher's embedding task with the identity probes is Σ_texts Σ_k (∂e_k/∂W)² rows."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from factorlm.calibration import collect_fisher

    onnx_path, names = tiny_bert_onnx
    fisher = collect_fisher(
        tiny_bert_dir, onnx_path, TEXTS, task="embedding", probes=np.eye(16),
        cache_dir=tmp_path, progress=False,
    )  # fmt: skip
    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    params = dict(model.named_parameters())
    encoder = {init: p.removeprefix("bert.") for init, p in names.items()}
    expected = {init: np.zeros(params[p].shape[0]) for init, p in encoder.items() if p in params}
    for text in TEXTS:
        enc = tok([text], return_tensors="pt")
        for k in range(16):
            pooled = model(**enc).last_hidden_state[0, :, k].mean()
            grads = torch.autograd.grad(
                pooled, [params[encoder[i]] for i in expected], allow_unused=True
            )
            for init, grad in zip(expected, grads, strict=True):
                if grad is not None:
                    expected[init] += grad.double().square().sum(1).numpy()
    assert set(fisher) == set(expected)
    for init in expected:
        np.testing.assert_allclose(fisher[init], expected[init], rtol=1e-4, atol=1e-12)


@pytest.mark.slow
def test_real_smollm_output_fisher(tmp_path: Path) -> None:
    from factorlm.assets import austen_dir, cache_root, smollm_dir
    from factorlm.errors import DataError

    try:
        source = smollm_dir()
    except DataError:
        pytest.skip("SmolLM2 is not prepared; run `factorlm assets smollm`")
    model = cache_root() / "onnx" / "SmolLM2-135M-Instruct-with-past" / "model.onnx"
    if not model.is_file():
        pytest.skip("SmolLM2 has not been exported (benchmarks/quality.py exports it)")
    words = (austen_dir() / "emma.txt").read_text(encoding="utf-8").split()[:120]
    texts = [" ".join(words[i : i + 40]) for i in range(0, 120, 40)]
    g = collect_output_fisher(
        source, model, texts, max_length=48, cache_dir=tmp_path, progress=False
    )
    proto = onnx.load(str(model), load_external_data=False)
    targets = {t.weight: t for t in find_targets(proto)}
    # Every q/k/v/o/gate/up/down MatMul of the 30 layers (the tied LM head is not a target).
    assert set(g) == set(targets) and len(g) == 210
    for name, values in g.items():
        assert values.shape == (targets[name].out_features,)
        assert np.all(np.isfinite(values)) and np.all(values >= 0) and values.sum() > 0
