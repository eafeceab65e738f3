"""collect_output_gram / output_fisher(full=True): the full output-gradient Gram ``Σ_t g_t g_tᵀ``
against hand-derived and per-sample autograd gradients, and its diagonal against the output Fisher."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from factorlm.calibration import collect_output_fisher, collect_output_gram, find_targets
from factorlm.calibration.fisher import map_to_onnx, output_fisher

TEXTS = ["the film is a good movie", "a bad plot", "the story is funny and clever and long"]


def _output_grams(model: Any, names: set[str], loss: Callable[[], Any]) -> dict[str, np.ndarray]:
    """``Σ g gᵀ`` over the first axes of ``g = ∂loss/∂y`` for the linear modules ``names``, by
    keeping their outputs and asking ``torch.autograd.grad`` directly (one unpadded sample)."""
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
        g = np.zeros((1, width)) if grad is None else grad.double().reshape(-1, width).numpy()
        result[key] = g.T @ g
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


def test_full_output_gram_equals_hand_derived_outer_products() -> None:
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
    h_full = output_fisher(tiny.module, [batch], tiny.loss, full=True)
    diagonal = output_fisher(tiny.module, [batch], tiny.loss)

    p = {k: v.detach().double().numpy() for k, v in tiny.module.named_parameters()}
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    h = np.tanh(x64 @ p["fc1.weight"].T + p["fc1.bias"])
    y = h @ p["fc2.weight"].T + p["fc2.bias"]
    z = h.mean(1) @ p["head.weight"].T + p["head.bias"]
    dz = 2 * z
    dy = y - t64
    dh = dy @ p["fc2.weight"] + (dz @ p["head.weight"])[:, None, :] / x.shape[1]
    d1 = dh * (1 - h**2)
    keep = mask.reshape(-1).astype(bool)  # the padded token is left out
    dy_kept, d1_kept = dy.reshape(-1, 2)[keep], d1.reshape(-1, 4)[keep]
    np.testing.assert_allclose(h_full["fc2.weight"], dy_kept.T @ dy_kept, rtol=1e-5)
    np.testing.assert_allclose(h_full["fc1.weight"], d1_kept.T @ d1_kept, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(h_full["head.weight"], dz.T @ dz, rtol=1e-5)  # not per token
    for name, gram in h_full.items():
        assert gram.dtype == np.float64 and gram.shape == (diagonal[name].size,) * 2
        np.testing.assert_allclose(np.diag(gram), diagonal[name], rtol=1e-6)  # f32 squares
        assert gram.size == 1 or np.abs(gram - np.diag(np.diag(gram))).max() > 0  # really full
    assert all(q.requires_grad and q.grad is None for q in tiny.module.parameters())


def test_lm_output_gram_diagonal_is_the_output_fisher_and_matches_autograd(
    tiny_llama_dir: Path, tiny_llama_past: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def collect(batch_size: int) -> dict[str, np.ndarray]:
        return collect_output_gram(
            tiny_llama_dir, tiny_llama_past, TEXTS, batch_size=batch_size, cache_dir=tmp_path,
            progress=False,
        )  # fmt: skip

    batched = collect(3)
    proto = onnx.load(str(tiny_llama_past))
    targets = {t.weight: t for t in find_targets(proto)}
    assert set(batched) == set(targets) and len(batched) == 14
    diagonal = collect_output_fisher(
        tiny_llama_dir, tiny_llama_past, TEXTS, batch_size=3, cache_dir=tmp_path, progress=False
    )
    for name, gram in batched.items():
        width = targets[name].out_features
        assert gram.shape == (width, width) and gram.dtype == np.float64
        np.testing.assert_allclose(gram, gram.T, rtol=0, atol=1e-12 * np.abs(gram).max())
        assert np.linalg.eigvalsh(gram).min() > -1e-9 * np.abs(gram).max()
        np.testing.assert_allclose(np.diag(gram), diagonal[name], rtol=1e-6)
    # Padding adds nothing: one text at a time gives the same Grams.
    alone = collect(1)
    for name in batched:
        scale = np.abs(alone[name]).max()  # float32 gradients: entries near 0 cancel
        np.testing.assert_allclose(batched[name], alone[name], rtol=1e-5, atol=1e-5 * scale)

    # Σ_texts Σ_tokens g gᵀ with L the HF next-token loss times its token count (autograd).
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    params = {n: q.detach().numpy() for n, q in model.named_parameters() if q.ndim == 2}
    mapping = {init: param for init, (param, _) in map_to_onnx(proto, params).items()}
    expected: dict[str, Any] = {param: 0.0 for param in mapping.values()}
    for text in TEXTS:
        enc = tok([text], return_tensors="pt")
        n = enc["input_ids"].shape[1]

        def loss(enc: Any = enc, n: int = n) -> Any:
            return model(**enc, labels=enc["input_ids"]).loss * (n - 1)

        for param, value in _output_grams(model, set(mapping.values()), loss).items():
            expected[param] = expected[param] + value
    for init, param in mapping.items():
        scale = np.abs(expected[param]).max()
        np.testing.assert_allclose(batched[init], expected[param], rtol=1e-4, atol=1e-5 * scale)

    # Cached under its own name: a second call reads the outgram-*.npz.
    assert len(list(tmp_path.glob("outgram-*.npz"))) == 2
    again = collect(3)
    for name in batched:
        np.testing.assert_array_equal(again[name], batched[name])


def test_embedding_output_gram_is_exact_with_any_orthonormal_probes(
    tiny_bert_dir: Path, tiny_bert_onnx: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """Σ_p (r_pᵀJ)ᵀ(r_pᵀJ) = Jᵀ(Σ_p r_p r_pᵀ)J = JᵀJ for orthonormal probes: the identity and a
    random rotation both give the exact Σ_k Σ_t (∂e_k/∂y_t)(∂e_k/∂y_t)ᵀ; half a basis does not."""
    from transformers import AutoModel, AutoTokenizer

    onnx_path, names = tiny_bert_onnx
    encoder = {
        init: param.removeprefix("bert.")
        for init, param in names.items()
        if param != "classifier.weight" and not param.startswith("bert.pooler.")
    }
    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    hidden = model.config.hidden_size
    exact: dict[str, Any] = {p: 0.0 for p in encoder.values()}
    for text in TEXTS:
        enc = tok([text], return_tensors="pt")
        for k in range(hidden):

            def loss(enc: Any = enc, k: int = k) -> Any:
                return model(**enc).last_hidden_state[0, :, k].mean()

            for name, value in _output_grams(model, set(encoder.values()), loss).items():
                exact[name] = exact[name] + value

    def collect(probes: np.ndarray) -> dict[str, np.ndarray]:
        return collect_output_gram(
            tiny_bert_dir, onnx_path, TEXTS, task="embedding", probes=probes, batch_size=2,
            cache_dir=tmp_path, progress=False,
        )  # fmt: skip

    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((hidden, hidden)))
    for basis in (np.eye(hidden), q.T):
        got = collect(basis)
        for init, param in encoder.items():
            scale = np.abs(exact[param]).max()
            np.testing.assert_allclose(got[init], exact[param], rtol=1e-4, atol=1e-6 * scale)
    half = collect(np.eye(hidden)[: hidden // 2])
    total = sum(np.trace(exact[p]) for p in encoder.values())
    assert sum(np.trace(half[i]) for i in encoder) < 0.9 * total
