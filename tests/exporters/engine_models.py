"""Models and helpers for the engine tests: a factorized MLP, BERT feeds, cosine.

The plain MLP, ``random_weight`` and ``run_ort`` are ``tests/models.py``'s (imported as
``models``, like the other suites: ``tests`` is not a package, so pytest puts it on the path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from factorlm._common.sessions import create_session
from factorlm.exporters.ort import EngineManifest
from models import random_weight, sequence_model

VOCAB = 96
SEQ = 16


def bert_feeds(batch: int = 2, seq: int = SEQ, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids with a padded tail in the second row, as a tokenizer would produce."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), dtype=np.int64)
    if batch > 1:
        mask[1, seq // 2 :] = 0
    return {
        "input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


def factorized_mlp(
    d_in: int = 32, hidden: int = 64, d_out: int = 24, rank: int = 8
) -> onnx.ModelProto:
    """x -> (x @ L1) @ R1 + b1 -> Relu -> (h @ L2) @ R2 + b2: factors named like factorlm's."""
    nodes = []
    inits = []
    prev = "x"
    for i, (m, n) in enumerate(((d_in, hidden), (hidden, d_out)), start=1):
        w = random_weight(m, n, seed=i, decay=0.2)
        u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        left = (u[:, :rank] * np.sqrt(s[:rank])).astype(np.float32)
        right = (np.sqrt(s[:rank])[:, None] * vt[:rank]).astype(np.float32)
        base = f"fc{i}.weight"
        inits += [
            numpy_helper.from_array(left, f"{base}.factorlm_left"),
            numpy_helper.from_array(right, f"{base}.factorlm_right"),
            numpy_helper.from_array(np.linspace(-0.1, 0.1, n, dtype=np.float32), f"fc{i}.bias"),
        ]
        nodes += [
            helper.make_node(
                "MatMul", [prev, f"{base}.factorlm_left"], [f"l{i}"], name=f"fc{i}/factorlm_lowrank"
            ),
            helper.make_node(
                "MatMul", [f"l{i}", f"{base}.factorlm_right"], [f"r{i}"], name=f"fc{i}/MatMul"
            ),
            helper.make_node("Add", [f"r{i}", f"fc{i}.bias"], [f"a{i}"], name=f"fc{i}/Add"),
        ]
        prev = f"a{i}"
        if i == 1:
            nodes.append(helper.make_node("Relu", [prev], ["h"], name="act"))
            prev = "h"
    nodes[-1].output[0] = "y"
    return sequence_model(nodes, inits, name="factorized_mlp", d_in=d_in, d_out=d_out)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flattened outputs, in float64."""
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def open_engine(engine_dir: Path, threads: int = 0) -> Any:
    """An ORT session of an engine directory with the settings its manifest records."""
    manifest = EngineManifest.load(engine_dir)
    return create_session(
        manifest.engine_path,
        providers=manifest.providers,
        graph_optimization_level=manifest.session["graph_optimization_level"],
        intra_op_num_threads=threads,
    )


def run_engine(engine_dir: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of an engine on ``feeds`` (one intra-op thread: deterministic sums)."""
    return [np.asarray(o) for o in open_engine(engine_dir, threads=1).run(None, feeds)]


def leftovers(parent: Path) -> list[str]:
    """Staging folders a build left in ``parent`` (there must be none)."""
    return [p.name for p in parent.iterdir() if p.name.endswith((".tmp", ".old"))]
