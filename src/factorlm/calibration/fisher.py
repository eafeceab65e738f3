"""Loss sensitivities per output feature (FWSVD and loss-aware weighting), from PyTorch.

Why PyTorch: ONNX Runtime has no gradients. Two statistics, both from the PyTorch model of the
same folder and keyed by the ONNX initializer they describe:

- :func:`collect_fisher` (FWSVD): the empirical Fisher of a weight ``W`` is
  ``Σ_samples (∂L/∂W)²``; FWSVD needs its row sums per output feature, ``I_j = Σ_i F_ij``.
  Each sample's loss is back-propagated on its own (``batch_size=1`` by default, the exact
  empirical Fisher; larger batches square the mean gradient of a batch instead).
- :func:`collect_output_fisher` (loss-aware weighting): the second moment of the gradient with
  respect to the layer's *output*, ``g_j = Σ_tokens (∂L/∂y_tj)²`` for ``y = x Wᵀ + b``. With the
  input Gram it gives a diagonal K-FAC estimate of the loss increase of replacing ``W`` by ``M``,
  ``‖X (W − M)ᵀ diag(√g)‖²/2``. Output gradients are per token, so one backward pass per batch is
  exact, and no weight gradient is ever allocated (cheaper than :func:`collect_fisher`).
- :func:`collect_output_gram`: the full output-gradient Gram ``H = Σ_tokens g_t g_tᵀ`` (out × out,
  float64; its diagonal is the statistic above), for the two-sided objective
  ``‖X (W − M)ᵀ H^{1/2}‖²`` that keeps the correlations between output features. Same tasks, same
  passes; memory ``8·out²`` bytes per weight (19 MB for a 1536-wide output).

Losses:
- ``lm``: next-token cross-entropy (causal LMs), padding ignored.
- ``embedding`` (sentence encoders, no labels): the sensitivity of the mean-pooled embedding
  ``e`` itself, ``Σ_k (∂e_k/∂·)²``, the statistic that fits an embedding-fidelity metric (pooled
  cosine). Estimated by Hutchinson probes: each of ``probes`` losses is ``Σ_samples rᵀ e(sample)``
  with ``r ~ N(0, I/probes)`` drawn per sample (seeded), and the squared gradients of the losses
  add up; ``E[(rᵀ ∂e/∂y)²] = Σ_k (∂e_k/∂y)² / probes``, so the sum is exact in expectation (and
  exact for any probe set ``R`` with ``RᵀR = I``, e.g. the identity: pass ``probes`` as an array).
- ``classification`` with a sequence-classification head: cross-entropy on the labels.
- ``classification`` on an encoder without a head (e.g. all-MiniLM-L6-v2): a *fixed linear
  probe* surrogate. A multinomial logistic regression is fitted (scikit-learn) on the frozen
  model's mean-pooled embeddings of the same samples, frozen, and the Fisher is that of the
  probe's cross-entropy through the encoder. It measures which features matter for the labels.

PyTorch parameters are mapped to ONNX initializers by name, else by value, accepting transposed
copies (optimum stores ``nn.Linear.weight`` transposed as ``onnx::MatMul_*``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from factorlm.calibration.stats import load_arrays, save_arrays
from factorlm.calibration.targets import find_targets
from factorlm.errors import ConfigError, DataError, ModelLoadError

__all__ = [
    "FISHER_TASKS",
    "collect_fisher",
    "collect_output_fisher",
    "collect_output_gram",
    "map_to_onnx",
    "output_fisher",
]

logger = logging.getLogger(__name__)

FISHER_TASKS = ("auto", "classification", "lm", "embedding")
_VERSION = 2  # 2: squares in float32, summed in float64
_OUTPUT_VERSION = 1
_GRAM_VERSION = 1


def _resolve_task(config: dict[str, Any], task: str, headless: str = "classification") -> str:
    """``auto``: ``lm`` for a causal LM, ``classification`` for a model with a classification
    head, else ``headless`` (FWSVD: the labelled probe; loss-aware: ``embedding``, which measured
    better for a sentence encoder's pooled embedding, benchmarks/results/minilm_loss_aware.md)."""
    if task not in FISHER_TASKS:
        raise ConfigError(f"Unknown Fisher task {task!r}; choose one of {', '.join(FISHER_TASKS)}.")
    if task != "auto":
        return task
    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "lm"
    return "classification" if any("ForSequenceClassification" in a for a in archs) else headless


def _linear_modules(model: Any) -> dict[str, tuple[Any, int]]:
    """Weight name -> (module, axis of output features in its weight) for every linear layer."""
    import torch

    out: dict[str, tuple[Any, int]] = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or weight.ndim != 2:
            continue
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, torch.nn.Linear):
            out[f"{prefix}weight"] = (module, 0)  # (out, in)
        elif type(module).__name__ == "Conv1D":  # GPT-2 style: (in, out)
            out[f"{prefix}weight"] = (module, 1)
    return out


def _linear_weights(model: Any) -> dict[str, tuple[Any, int]]:
    """Parameter name -> (parameter, axis of output features) for every linear layer."""
    return {name: (m.weight, axis) for name, (m, axis) in _linear_modules(model).items()}


def map_to_onnx(
    onnx_model: onnx.ModelProto, params: dict[str, np.ndarray]
) -> dict[str, tuple[str, bool]]:
    """Map ONNX target initializers to PyTorch parameter names: ``{init: (param, transposed)}``.

    By name first (same name and equal values, possibly transposed), then by exact value.
    """
    from onnx import numpy_helper

    targets = {t.weight for t in find_targets(onnx_model)}
    by_value: dict[tuple[tuple[int, ...], bytes], tuple[str, bool]] = {}
    for name, array in params.items():
        a = np.ascontiguousarray(array, dtype=np.float32)
        by_value.setdefault((a.shape, hashlib.sha1(a.tobytes()).digest()), (name, False))
        t = np.ascontiguousarray(a.T)
        by_value.setdefault((t.shape, hashlib.sha1(t.tobytes()).digest()), (name, True))
    mapping: dict[str, tuple[str, bool]] = {}
    for init in onnx_model.graph.initializer:
        if init.name not in targets:
            continue
        value = np.ascontiguousarray(numpy_helper.to_array(init), dtype=np.float32)
        if init.name in params:
            ref = params[init.name]
            if ref.shape == value.shape and np.array_equal(ref, value):
                mapping[init.name] = (init.name, False)
                continue
            if ref.T.shape == value.shape and np.array_equal(ref.T, value):
                mapping[init.name] = (init.name, True)
                continue
        hit = by_value.get((value.shape, hashlib.sha1(value.tobytes()).digest()))
        if hit is not None:
            mapping[init.name] = hit
    logger.info("Mapped %s of %s ONNX weights to PyTorch parameters", len(mapping), len(targets))
    return mapping


def _fit_probe(model: Any, encoded: list[dict[str, Any]], labels: np.ndarray) -> Any:
    """A frozen linear probe (logistic regression on mean-pooled embeddings) as a torch layer."""
    import torch
    from sklearn.linear_model import LogisticRegression

    feats = []
    with torch.no_grad():
        for batch in encoded:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            feats.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    x = np.concatenate(feats)
    classes = np.unique(labels)
    clf = LogisticRegression(max_iter=1000).fit(x, labels)
    coef = clf.coef_ if len(classes) > 2 else np.concatenate([-clf.coef_, clf.coef_]) / 2
    bias = (
        clf.intercept_
        if len(classes) > 2
        else np.concatenate([-clf.intercept_, clf.intercept_]) / 2
    )
    probe = torch.nn.Linear(x.shape[1], len(classes))
    with torch.no_grad():
        probe.weight.copy_(torch.from_numpy(coef.astype(np.float32)))
        probe.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    probe.requires_grad_(False)
    logger.info(
        "Fitted a %s-class linear probe (train accuracy %.3f)", len(classes), clf.score(x, labels)
    )
    return probe


def _mean_pool(model: Any, batch: Mapping[str, Any]) -> Any:
    """The mask-weighted mean of the last hidden states, (batch, hidden)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def _check_probes(probes: int | np.ndarray) -> int | np.ndarray:
    """A probe count >= 1, or a float64 probe matrix (count, hidden) of finite values."""
    if isinstance(probes, np.ndarray):
        array = np.asarray(probes, dtype=np.float64)
        if array.ndim != 2 or array.shape[0] < 1 or not np.isfinite(array).all():
            raise ConfigError(
                f"probes must be a finite (count, hidden) matrix, not shape {array.shape}."
            )
        return array
    if int(probes) < 1:
        raise ConfigError(f"probes must be at least 1, not {probes}.")
    return int(probes)


class _Job:
    """Everything both collectors share: the resolved task, the data, and the model with its loss.

    Why one class: the two statistics differ only in what is read from each backward pass, so
    data reading, cache keys, model loading, batching and the loss are written once here.
    ``probes`` / ``seed``: the Hutchinson probes of the ``embedding`` task (ignored otherwise).
    """

    def __init__(
        self,
        hf_model_dir: Path,
        onnx_model: Path,
        data: Path | Sequence[str],
        *,
        task: str,
        text_column: str,
        label_column: str,
        labels: Sequence[str] | None,
        max_samples: int,
        max_length: int,
        batch_size: int,
        probes: int | np.ndarray = 8,
        seed: int = 0,
        headless: str = "classification",
    ) -> None:
        from factorlm.data import load_texts, read_labelled
        from factorlm.exporters.hf import check_model_dir

        self.hf_model_dir, self.onnx_model = Path(hf_model_dir), Path(onnx_model)
        self.config = check_model_dir(self.hf_model_dir)
        self.task = _resolve_task(self.config, task, headless)
        if not self.onnx_model.is_file():
            raise ModelLoadError(f"The ONNX model {self.onnx_model} does not exist.")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, not {batch_size}.")
        self.data, self.max_length, self.batch_size = data, max_length, batch_size
        self.probes, self.seed = _check_probes(probes), int(seed)
        self.sample_labels: list[str] | None = None
        if self.task == "classification":
            if not isinstance(data, str | Path):
                raise DataError(
                    "Fisher for classification needs a labelled data file, not a text list."
                )
            self.texts, self.sample_labels = read_labelled(
                Path(data),
                text_column=text_column,
                label_column=label_column,
                max_samples=max_samples,
                labels=labels,
            )
            if len(set(self.sample_labels)) < 2:
                raise DataError(
                    f"{data} has only one label in {label_column!r}; Fisher needs two or more."
                )
        else:
            self.texts = load_texts(data, text_column, max_samples)
        self.model: Any = None
        self.batches: list[dict[str, Any]] = []
        self.targets: np.ndarray | None = None
        self.probe: Any = None

    def cache_file(self, prefix: str, version: int, cache_dir: Path | None) -> Path:
        """Where the statistic is cached: keyed by weights, ONNX file, data and settings."""
        from factorlm._common.files import cache_root, sha256_file
        from factorlm.calibration.capture import file_digest
        from factorlm.data import texts_digest

        folder = self.hf_model_dir
        weights_digest = hashlib.sha256()
        for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            weights_digest.update(sha256_file(file).encode())
        key = hashlib.sha256(
            json.dumps(
                {
                    "version": version,
                    "hf": weights_digest.hexdigest(),
                    "onnx": file_digest(self.onnx_model),
                    "texts": texts_digest(self.texts),
                    "labels": texts_digest(self.sample_labels or []),
                    "task": self.task,
                    "max_length": self.max_length,
                    "batch_size": self.batch_size,
                    **self.probe_key(),
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:32]
        cache = Path(cache_dir) if cache_dir is not None else cache_root() / "calibration"
        return cache / f"{prefix}-{key}.npz"

    def probe_key(self) -> dict[str, Any]:
        """The probe settings in the cache key (only for ``embedding``: other keys unchanged)."""
        if self.task != "embedding":
            return {}
        if isinstance(self.probes, np.ndarray):
            digest = hashlib.sha256(np.ascontiguousarray(self.probes).tobytes())
            return {"probes": f"{self.probes.shape}:{digest.hexdigest()}"}
        return {"probes": self.probes, "seed": self.seed}

    def load(self) -> None:
        """Load the model (eval, float32), tokenize the batches and set up the labels or probe."""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

        from factorlm._common.text import load_hf_tokenizer

        tok = load_hf_tokenizer(self.hf_model_dir)
        # Right padding: real tokens keep positions 0..n-1, and a causal model's real tokens
        # never see the padding after them.
        tok.padding_side = "right"
        archs = self.config.get("architectures") or []
        has_head = any(a.endswith("ForSequenceClassification") for a in archs)
        folder = self.hf_model_dir
        if self.task == "lm":
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        elif self.task == "embedding":  # the encoder alone: a head would not reach e
            model = AutoModel.from_pretrained(folder, dtype=torch.float32)
        elif has_head:
            model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
        else:
            model = AutoModel.from_pretrained(folder, dtype=torch.float32)
        self.model = model.eval()
        for start in range(0, len(self.texts), self.batch_size):
            enc = tok(
                self.texts[start : start + self.batch_size],
                padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
            )  # fmt: skip
            self.batches.append(
                {
                    k: v
                    for k, v in enc.items()
                    if k in ("input_ids", "attention_mask", "token_type_ids")
                }
            )
        if self.sample_labels is None:
            return
        if has_head:
            label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
            if not all(lab in label2id for lab in self.sample_labels):
                unknown = next(lab for lab in self.sample_labels if lab not in label2id)
                raise DataError(
                    f"Label {unknown!r} of {self.data} is not one of the model's labels "
                    f"{sorted(label2id)}."
                )
            self.targets = np.array([label2id[lab] for lab in self.sample_labels])
        else:
            classes = sorted(set(self.sample_labels))
            self.targets = np.array([classes.index(lab) for lab in self.sample_labels])
            self.probe = _fit_probe(model, self.batches, self.targets)

    def loss(self, index: int, batch: Mapping[str, Any], reduction: str) -> Any:
        """The task loss of batch ``index``: ``"mean"`` over samples/tokens or their ``"sum"``."""
        import torch

        model = self.model
        if self.task == "lm":
            ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            if reduction == "mean":
                return model(**batch, labels=ids).loss
            logits = model(**batch).logits[:, :-1]
            return torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
        assert self.targets is not None
        n = batch["input_ids"].shape[0]
        start = index * self.batch_size
        y = torch.from_numpy(self.targets[start : start + n])
        if self.probe is not None:
            logits = self.probe(_mean_pool(model, batch))
        else:
            logits = model(**batch).logits
        return torch.nn.functional.cross_entropy(logits, y, reduction=reduction)

    def losses(self, index: int, batch: Mapping[str, Any], reduction: str) -> list[Any]:
        """The losses whose squared gradients add up: one probe loss each for ``embedding``
        (``Σ_samples r_pᵀ e``, see the module docstring), else ``[loss(...)]``."""
        import torch

        if self.task != "embedding":
            return [self.loss(index, batch, reduction)]
        pooled = _mean_pool(self.model, batch)
        n, width = pooled.shape
        if isinstance(self.probes, np.ndarray):
            if self.probes.shape[1] != width:
                raise ConfigError(
                    f"probes have {self.probes.shape[1]} columns but the embedding has {width}."
                )
            r = np.broadcast_to(self.probes[:, None, :], (self.probes.shape[0], n, width))
        else:  # per sample and probe, seeded by batch: r ~ N(0, I / probes)
            rng = np.random.default_rng([self.seed, index])
            r = rng.standard_normal((self.probes, n, width)) / np.sqrt(self.probes)
        vectors = torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32))
        return [(pooled * v).sum() for v in vectors]

    def mapping(self) -> dict[str, tuple[str, bool]]:
        """ONNX initializer -> (PyTorch weight name, transposed); fails when nothing maps."""
        proto = onnx.load(str(self.onnx_model))
        params = {name: p.detach().numpy() for name, (p, _) in _linear_weights(self.model).items()}
        mapping = map_to_onnx(proto, params)
        if not mapping:
            raise ModelLoadError(
                f"No weight of {self.onnx_model} matches a linear layer of {self.hf_model_dir} "
                "by name or value."
            )
        return mapping


@contextmanager
def _progress(description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar; yields ``advance(n)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not enabled) as bar:
        job = bar.add_task(description, total=total)
        yield lambda n: bar.advance(job, n)


def collect_fisher(
    hf_model_dir: Path,
    onnx_model: Path,
    data: Path | Sequence[str],
    *,
    task: str = "auto",
    text_column: str = "text",
    label_column: str = "label",
    labels: Sequence[str] | None = None,
    max_samples: int = 128,
    max_length: int = 128,
    batch_size: int = 1,
    cache_dir: Path | None = None,
    progress: bool = True,
    probes: int | np.ndarray = 8,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Fisher row sums ``(out,)`` float64 per ONNX initializer, from the PyTorch model's gradients.

    ``data`` is a labelled file for ``classification`` (``label_column``; ``labels`` keeps only
    records with those labels, e.g. ``("fresh", "rotten")``) or texts for ``lm`` and
    ``embedding`` (``probes`` / ``seed``: its Hutchinson probes, see the module docstring).
    Raises ``DataError`` for unusable data (no labels column, one class only, empty data).
    """
    import torch

    job = _Job(
        hf_model_dir, onnx_model, data, task=task, text_column=text_column,
        label_column=label_column, labels=labels, max_samples=max_samples,
        max_length=max_length, batch_size=batch_size, probes=probes, seed=seed,
    )  # fmt: skip
    cached = job.cache_file("fisher", _VERSION, cache_dir)
    if cached.is_file():
        logger.info("Loading cached Fisher information %s", cached)
        return load_arrays(cached)[0].get("fisher", {})

    job.load()
    model = job.model
    linear = _linear_weights(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for param, _ in linear.values():
        param.requires_grad_(True)

    fisher = {
        name: torch.zeros(p.shape[axis], dtype=torch.float64) for name, (p, axis) in linear.items()
    }
    description = f"Fisher ({job.task}) of {job.hf_model_dir.name}"
    with _progress(description, len(job.texts), progress) as advance:
        for index, batch in enumerate(job.batches):
            values = job.losses(index, batch, "mean")
            for k, value in enumerate(values):
                model.zero_grad(set_to_none=True)
                value.backward(retain_graph=k + 1 < len(values))
                for name, (param, axis) in linear.items():
                    if param.grad is not None:
                        # squares in float32 (relative error 6e-8), summed in float64:
                        # faster than squaring a float64 copy of every gradient
                        square = param.grad.square()
                        fisher[name] += square.sum(dim=1 - axis, dtype=torch.float64)
            advance(batch["input_ids"].shape[0])

    mapping = job.mapping()
    result = {init: fisher[param].numpy() for init, (param, _) in mapping.items()}
    try:
        save_arrays(cached, {"fisher": result}, {"task": job.task, "samples": len(job.texts)})
    except OSError as exc:
        logger.warning("Could not cache Fisher information in %s: %s", cached, exc)
    return result


def output_fisher(
    model: Any,
    batches: Sequence[Mapping[str, Any]],
    loss: Callable[[int, Mapping[str, Any]], Any],
    *,
    weights: Collection[str] | None = None,
    mask_key: str = "attention_mask",
    advance: Callable[[int], None] | None = None,
    full: bool = False,
) -> dict[str, np.ndarray]:
    """``g_j = Σ_tokens (∂L/∂y_tj)²`` (float64, one per output feature) of every linear layer;
    with ``full``, the whole Gram ``Σ_tokens g_t g_tᵀ`` (out × out, float64) instead.

    ``loss(index, batch)`` returns the scalar loss of batch ``index`` (the model is called inside
    it), or a list of scalar losses from one forward pass, each back-propagated in turn with
    their squared gradients added (Hutchinson probes, see the module docstring); keys are weight
    names (``"<module>.weight"``), restricted to ``weights`` if given.
    Tokens where ``batch[mask_key] == 0`` are left out for outputs shaped (batch, tokens, out);
    outputs of any other shape (a pooler, a classifier) are summed over all leading axes.

    Only activations carry gradients: the parameters are frozen during the call (their flags are
    restored afterwards), and the input embeddings' output and the batch's floating tensors are
    made to require grad, so backward reaches every linear output without weight gradients.
    The gradients are those of the loss as given: with a loss summed over tokens, ``g`` is a sum
    over tokens whatever the batch size (a mean would scale each batch by 1/its size).
    """
    import torch

    modules = _linear_modules(model)
    if weights is not None:
        wanted = set(weights)
        modules = {name: entry for name, entry in modules.items() if name in wanted}
    sums = {
        name: torch.zeros((module.weight.shape[axis],) * (2 if full else 1), dtype=torch.float64)
        for name, (module, axis) in modules.items()
    }
    mask: list[Any] = [None]  # the current batch's token mask, read by the gradient hooks

    def accumulate(name: str) -> Callable[[Any], None]:
        def hook(grad: Any) -> None:
            if full:  # masked rows are zero, so they add nothing to Σ g gᵀ
                flat = grad.detach().double()
                m = mask[0]
                if m is not None and flat.ndim == 3 and tuple(flat.shape[:2]) == tuple(m.shape):
                    flat = flat * m.unsqueeze(-1).to(flat.dtype)
                flat = flat.reshape(-1, flat.shape[-1])
                sums[name] += flat.T @ flat
                return
            square = grad.detach().square()
            m = mask[0]
            if m is not None and square.ndim == 3 and tuple(square.shape[:2]) == tuple(m.shape):
                square = square * m.unsqueeze(-1).to(square.dtype)
            sums[name] += square.reshape(-1, square.shape[-1]).sum(0, dtype=torch.float64)

        return hook

    def on_output(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(accumulate(name))

        return hook

    def needs_grad(module: Any, args: Any, output: Any) -> None:
        tensor = isinstance(output, torch.Tensor)
        if tensor and output.is_floating_point() and not output.requires_grad:
            output.requires_grad_(True)

    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = [module.register_forward_hook(on_output(n)) for n, (module, _) in modules.items()]
    embeddings = getattr(model, "get_input_embeddings", None)
    embedding = embeddings() if callable(embeddings) else None
    if isinstance(embedding, torch.nn.Module):
        handles.append(embedding.register_forward_hook(needs_grad))
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        with torch.enable_grad():
            for index, batch in enumerate(batches):
                inputs = {
                    k: v.detach().requires_grad_(True)
                    if isinstance(v, torch.Tensor) and v.is_floating_point()
                    else v
                    for k, v in batch.items()
                }
                mask[0] = inputs.get(mask_key)
                value = loss(index, inputs)
                values = list(value) if isinstance(value, list | tuple) else [value]
                for k, one in enumerate(values):
                    if not one.requires_grad:
                        raise ModelLoadError(
                            "The loss does not depend on any activation that can carry a "
                            "gradient (no input embeddings and no floating-point input)."
                        )
                    one.backward(retain_graph=k + 1 < len(values))
                if advance is not None:
                    advance(int(next(iter(batch.values())).shape[0]))
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in flags:
            param.requires_grad_(flag)
    return {name: total.numpy() for name, total in sums.items()}


def collect_output_fisher(
    hf_model_dir: Path,
    onnx_model: Path,
    data: Path | Sequence[str],
    *,
    task: str = "auto",
    text_column: str = "text",
    label_column: str = "label",
    labels: Sequence[str] | None = None,
    max_samples: int = 128,
    max_length: int = 128,
    batch_size: int = 4,
    cache_dir: Path | None = None,
    progress: bool = True,
    probes: int | np.ndarray = 8,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Output-gradient second moments ``g`` ``(out,)`` float64 per ONNX initializer.

    ``g_j = Σ_tokens (∂L/∂y_tj)²`` for each linear layer ``y = x Wᵀ + b``, with ``L`` the *sum*
    (not the mean) of the per-token next-token cross-entropies (``lm``; padding excluded) or of
    the per-sample cross-entropies (``classification``, head or fixed linear probe as in
    :func:`collect_fisher`); for ``embedding`` (texts, no labels), ``g_j = Σ_tokens Σ_k
    (∂e_k/∂y_tj)²`` of the mean-pooled embedding ``e``, estimated with ``probes`` Hutchinson
    probes (an int: seeded Gaussian ones; an array (count, hidden): those, e.g. the identity
    for the exact value; see the module docstring). So ``g`` is a sum over calibration tokens, independent of
    ``batch_size`` (one backward per batch is exact: output gradients are per token); divide by
    the token count for a per-token scale. Weights that do not map to an ONNX initializer (a tied
    LM head stored as the embedding) are skipped. ``data`` as for :func:`collect_fisher`.
    """
    job = _Job(
        hf_model_dir, onnx_model, data, task=task, text_column=text_column,
        label_column=label_column, labels=labels, max_samples=max_samples,
        max_length=max_length, batch_size=batch_size, probes=probes, seed=seed,
        headless="embedding",
    )  # fmt: skip
    return _collect_output(job, full=False, cache_dir=cache_dir, progress=progress)


def collect_output_gram(
    hf_model_dir: Path,
    onnx_model: Path,
    data: Path | Sequence[str],
    *,
    task: str = "auto",
    text_column: str = "text",
    label_column: str = "label",
    labels: Sequence[str] | None = None,
    max_samples: int = 128,
    max_length: int = 128,
    batch_size: int = 4,
    cache_dir: Path | None = None,
    progress: bool = True,
    probes: int | np.ndarray = 8,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Output-gradient Grams ``H = Σ_tokens g_t g_tᵀ`` ``(out, out)`` float64 per ONNX initializer.

    ``g_t = ∂L/∂y_t`` of each linear layer at each non-padding token, with the tasks, losses,
    batching and arguments of :func:`collect_output_fisher`, whose result is ``H``'s diagonal.
    For ``embedding`` the Hutchinson estimate is unbiased for the full Gram too:
    ``E[(rᵀJ)ᵀ(rᵀJ)] = JᵀJ / probes`` per probe. Cached like the other statistics (a separate
    ``outgram-*.npz``); ``8·out²`` bytes per weight in memory and on disk.
    """
    job = _Job(
        hf_model_dir, onnx_model, data, task=task, text_column=text_column,
        label_column=label_column, labels=labels, max_samples=max_samples,
        max_length=max_length, batch_size=batch_size, probes=probes, seed=seed,
        headless="embedding",
    )  # fmt: skip
    return _collect_output(job, full=True, cache_dir=cache_dir, progress=progress)


def _collect_output(
    job: _Job, *, full: bool, cache_dir: Path | None, progress: bool
) -> dict[str, np.ndarray]:
    """The output Fisher (``full=False``) or Gram of ``job``: from the cache, else collected and
    cached. The diagonal keeps its original cache name and group (``outfisher``, ``fisher``)."""
    what = "output Gram" if full else "output Fisher"
    title = what[0].upper() + what[1:]
    prefix, version, group = (
        ("outgram", _GRAM_VERSION, "output_gram") if full
        else ("outfisher", _OUTPUT_VERSION, "fisher")
    )  # fmt: skip
    cached = job.cache_file(prefix, version, cache_dir)
    if cached.is_file():
        logger.info("Loading cached %s %s", what, cached)
        return load_arrays(cached)[0].get(group, {})

    job.load()
    mapping = job.mapping()
    linear = _linear_modules(job.model)
    logger.info(
        "%s for %s of %s linear layers (the others do not map to %s)", title,
        len({param for param, _ in mapping.values()}), len(linear), job.onnx_model.name,
    )  # fmt: skip
    description = f"{title} ({job.task}) of {job.hf_model_dir.name}"
    with _progress(description, len(job.texts), progress) as advance:
        g = output_fisher(
            job.model,
            job.batches,
            lambda index, batch: job.losses(index, batch, "sum"),
            weights={param for param, _ in mapping.values()},
            advance=advance,
            full=full,
        )
    result = {init: g[param] for init, (param, _) in mapping.items()}
    tokens = sum(int(b["attention_mask"].sum()) for b in job.batches)
    try:
        save_arrays(
            cached,
            {group: result},
            {"task": job.task, "samples": len(job.texts), "tokens": tokens, **job.probe_key()},
        )
    except OSError as exc:
        logger.warning("Could not cache the %s in %s: %s", what, cached, exc)
    return result
