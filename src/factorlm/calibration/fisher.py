"""Fisher information per output feature (for FWSVD), from the PyTorch model of the same folder.

Why PyTorch: ONNX Runtime has no gradients. The empirical Fisher of a weight ``W`` is
``Σ_samples (∂L/∂W)²``; FWSVD needs its row sums per output feature, ``I_j = Σ_i F_ij``.
Each sample's loss is back-propagated on its own (``batch_size=1`` by default, the exact
empirical Fisher; larger batches square the mean gradient of a batch instead).

Losses:
- ``lm``: next-token cross-entropy (causal LMs), padding ignored.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from factorlm.calibration.stats import load_arrays, save_arrays
from factorlm.calibration.targets import find_targets
from factorlm.errors import ConfigError, DataError, ModelLoadError

__all__ = ["FISHER_TASKS", "collect_fisher", "map_to_onnx"]

logger = logging.getLogger(__name__)

FISHER_TASKS = ("auto", "classification", "lm")
_VERSION = 1


def _resolve_task(config: dict[str, Any], task: str) -> str:
    if task not in FISHER_TASKS:
        raise ConfigError(f"Unknown Fisher task {task!r}; choose one of {', '.join(FISHER_TASKS)}.")
    if task != "auto":
        return task
    archs = config.get("architectures") or []
    return (
        "lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "classification"
    )


def _linear_weights(model: Any) -> dict[str, tuple[Any, int]]:
    """Parameter name -> (parameter, axis of output features) for every linear layer."""
    import torch

    out: dict[str, tuple[Any, int]] = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or weight.ndim != 2:
            continue
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, torch.nn.Linear):
            out[f"{prefix}weight"] = (weight, 0)  # (out, in)
        elif type(module).__name__ == "Conv1D":  # GPT-2 style: (in, out)
            out[f"{prefix}weight"] = (weight, 1)
    return out


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
) -> dict[str, np.ndarray]:
    """Fisher row sums ``(out,)`` float64 per ONNX initializer, from the PyTorch model's gradients.

    ``data`` is a labelled file for ``classification`` (``label_column``; ``labels`` keeps only
    records with those labels, e.g. ``("fresh", "rotten")``) or texts for ``lm``.
    Raises ``DataError`` for unusable data (no labels column, one class only, empty data).
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from factorlm._common.files import cache_root
    from factorlm._common.text import load_hf_tokenizer as load_tokenizer
    from factorlm.calibration.capture import file_digest
    from factorlm.data import load_texts, read_labelled, texts_digest
    from factorlm.exporters.hf import check_model_dir

    hf_model_dir, onnx_model = Path(hf_model_dir), Path(onnx_model)
    config = check_model_dir(hf_model_dir)
    task = _resolve_task(config, task)
    if not onnx_model.is_file():
        raise ModelLoadError(f"The ONNX model {onnx_model} does not exist.")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}.")

    sample_labels: list[str] | None = None
    if task == "classification":
        if not isinstance(data, str | Path):
            raise DataError(
                "Fisher for classification needs a labelled data file, not a text list."
            )
        texts, sample_labels = read_labelled(
            Path(data),
            text_column=text_column,
            label_column=label_column,
            max_samples=max_samples,
            labels=labels,
        )
        if len(set(sample_labels)) < 2:
            raise DataError(
                f"{data} has only one label in {label_column!r}; Fisher needs two or more."
            )
    else:
        texts = load_texts(data, text_column, max_samples)

    from factorlm._common.files import sha256_file

    weights_digest = hashlib.sha256()
    for file in sorted(hf_model_dir.glob("*.safetensors")) + sorted(hf_model_dir.glob("*.bin")):
        weights_digest.update(sha256_file(file).encode())
    key = hashlib.sha256(
        json.dumps(
            {
                "version": _VERSION,
                "hf": weights_digest.hexdigest(),
                "onnx": file_digest(onnx_model),
                "texts": texts_digest(texts),
                "labels": texts_digest(sample_labels or []),
                "task": task,
                "max_length": max_length,
                "batch_size": batch_size,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:32]
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "calibration"
    cached = cache / f"fisher-{key}.npz"
    if cached.is_file():
        logger.info("Loading cached Fisher information %s", cached)
        return load_arrays(cached)[0].get("fisher", {})

    tok = load_tokenizer(hf_model_dir)
    archs = config.get("architectures") or []
    has_head = any(a.endswith("ForSequenceClassification") for a in archs)
    if task == "lm":
        model = AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32)
    elif has_head:
        model = AutoModelForSequenceClassification.from_pretrained(
            hf_model_dir, dtype=torch.float32
        )
    else:
        model = AutoModel.from_pretrained(hf_model_dir, dtype=torch.float32)
    model.eval()
    linear = _linear_weights(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for param, _ in linear.values():
        param.requires_grad_(True)

    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tok(
            texts[start : start + batch_size],
            padding=True, truncation=True, max_length=max_length, return_tensors="pt",
        )  # fmt: skip
        batches.append(
            {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        )

    targets_np: np.ndarray | None = None
    probe = None
    if sample_labels is not None:
        if has_head:
            label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
            if not all(lab in label2id for lab in sample_labels):
                unknown = next(lab for lab in sample_labels if lab not in label2id)
                raise DataError(
                    f"Label {unknown!r} of {data} is not one of the model's labels {sorted(label2id)}."
                )
            targets_np = np.array([label2id[lab] for lab in sample_labels])
        else:
            classes = sorted(set(sample_labels))
            targets_np = np.array([classes.index(lab) for lab in sample_labels])
            probe = _fit_probe(model, batches, targets_np)

    fisher = {
        name: torch.zeros(p.shape[axis], dtype=torch.float64) for name, (p, axis) in linear.items()
    }
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        job = bar.add_task(f"Fisher ({task}) of {hf_model_dir.name}", total=len(texts))
        for index, batch in enumerate(batches):
            model.zero_grad(set_to_none=True)
            n = batch["input_ids"].shape[0]
            if task == "lm":
                ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
                loss = model(**batch, labels=ids).loss
            else:
                assert targets_np is not None
                y = torch.from_numpy(targets_np[index * batch_size : index * batch_size + n])
                if probe is not None:
                    hidden = model(**batch).last_hidden_state
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    logits = probe((hidden * mask).sum(1) / mask.sum(1))
                else:
                    logits = model(**batch).logits
                loss = torch.nn.functional.cross_entropy(logits, y)
            loss.backward()
            for name, (param, axis) in linear.items():
                if param.grad is not None:
                    fisher[name] += (param.grad.double() ** 2).sum(dim=1 - axis)
            bar.advance(job, n)

    proto = onnx.load(str(onnx_model))
    params = {name: p.detach().numpy() for name, (p, _) in linear.items()}
    mapping = map_to_onnx(proto, params)
    if not mapping:
        raise ModelLoadError(
            f"No weight of {onnx_model} matches a linear layer of {hf_model_dir} by name or value."
        )
    result = {init: fisher[param].numpy() for init, (param, _) in mapping.items()}
    try:
        save_arrays(cached, {"fisher": result}, {"task": task, "samples": len(texts)})
    except OSError as exc:
        logger.warning("Could not cache Fisher information in %s: %s", cached, exc)
    return result
