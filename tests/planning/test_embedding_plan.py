"""Token embeddings are planned at their own ratio; a tied LM head shares the entry and its FLOPs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from factorlm.errors import PlanError
from factorlm.passes import Analysis, analyze
from factorlm.planning import make_plan, validate_plan
from models import embedding_lm


def _analysis(tie: str) -> Analysis:
    return analyze(ir.serde.deserialize_model(embedding_lm(vocab=96, d=32, tie=tie)))


@pytest.mark.parametrize(
    ("tie", "reason"),
    [
        ("transpose", "token embedding and the LM head tied to it left dense"),
        ("gemm", "token embedding and the LM head tied to it left dense"),
        ("none", "token embedding left dense (set --embeddings RATIO to factorize it)"),
    ],
)
def test_an_unplanned_embedding_says_whether_a_head_is_tied(tie: str, reason: str) -> None:
    plan = make_plan(_analysis(tie), method="svd", ratio=0.5, rank_multiple=4)
    assert plan.skipped["embed.weight"].startswith(reason)
    assert "embed.weight" not in plan.weights


def test_a_tied_embedding_is_one_entry_with_the_head_s_flops() -> None:
    """Rank from the embedding ratio; params once for both uses; FLOPs: the head, then the
    head's two products plus the lookup's ``r × d`` MatMul; error from the SVD spectrum."""
    vocab, d = 96, 32
    plan = make_plan(
        _analysis("transpose"),
        method="svd", ratio=0.5, rank_multiple=4, embeddings=0.5,
    )  # fmt: skip
    entry = plan.weights["embed.weight"]
    assert entry.kind == "embedding" and entry.method == "svd"
    rank = int(0.5 * vocab * d / (vocab + d)) // 4 * 4
    assert entry.rank == rank == 12
    assert entry.params_before == vocab * d and entry.params_after == rank * (vocab + d)
    assert entry.flops_before == 2 * vocab * d
    assert entry.flops_after == 2 * rank * (vocab + d) + 2 * rank * d
    weight = numpy_helper.to_array(
        next(
            t for t in embedding_lm(vocab=vocab, d=d).graph.initializer if t.name == "embed.weight"
        )
    )
    s = np.linalg.svd(weight.astype(np.float64), compute_uv=False)
    assert entry.expected_error == pytest.approx(np.sqrt((s[rank:] ** 2).sum() / (s**2).sum()))
    assert sorted(entry.nodes) == ["embed/Gather", "head/MatMul"]


@dataclass
class _Stats:
    gram: dict[str, np.ndarray] = field(default_factory=dict)
    mean_abs: dict[str, np.ndarray] = field(default_factory=dict)
    fisher: dict[str, np.ndarray] = field(default_factory=dict)
    token_counts: dict[str, np.ndarray] = field(default_factory=dict)


def _gram(d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8 * d, d)) * rng.uniform(0.05, 3.0, d)  # anisotropic inputs
    return x.T @ x


def test_a_tied_embedding_is_whitened_by_the_head_s_inputs() -> None:
    """whiten + the head's input Gram: the entry is whitened, its expected error is the error of
    the logits, and the plan validates; an untied embedding takes plain SVD only."""
    stats = _Stats(gram={"embed.weight": _gram(32, 1), "dense.weight": _gram(32, 2)})
    analysis = _analysis("transpose")
    kwargs = {"ratio": 0.5, "rank_multiple": 4, "embeddings": 0.5, "stats": stats}
    whitened = make_plan(analysis, method="whiten", **kwargs)  # type: ignore[arg-type]
    plain = make_plan(analysis, method="svd", **kwargs)  # type: ignore[arg-type]
    entry, svd_entry = whitened.weights["embed.weight"], plain.weights["embed.weight"]
    assert (entry.method, svd_entry.method) == ("whiten", "svd")
    assert entry.rank == svd_entry.rank == 12
    assert entry.shape == [32, 96] and entry.stored_shape == [96, 32]
    assert (entry.params_after, entry.flops_after) == (
        svd_entry.params_after,
        svd_entry.flops_after,
    )
    assert entry.expected_error != pytest.approx(svd_entry.expected_error)
    assert validate_plan(whitened, analysis).weights["embed.weight"].method == "whiten"

    untied = _analysis("none")
    stats.gram["head.weight"] = _gram(32, 3)
    plan = make_plan(untied, method="whiten", **kwargs)  # type: ignore[arg-type]
    assert plan.weights["embed.weight"].method == "svd"  # a lookup alone has no input Gram
    plan.weights["embed.weight"].method = "whiten"
    with pytest.raises(PlanError, match="token embedding; only method 'svd'"):
        validate_plan(plan, untied)


def test_a_tied_head_without_statistics_falls_back_to_svd(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Statistics collected without the head's Gram (an older --stats file): plain SVD, warned."""
    stats = _Stats(gram={"dense.weight": _gram(32, 2)})
    with caplog.at_level(logging.WARNING, logger="factorlm.planning.lowrank"):
        plan = make_plan(
            _analysis("transpose"),
            method="whiten", ratio=0.5, rank_multiple=4, embeddings=0.5,
            stats=stats,
        )  # fmt: skip
    assert plan.weights["embed.weight"].method == "svd"
    assert "no gram for the LM head tied to embed.weight" in caplog.text


def test_lookup_counts_weight_the_rows_of_a_whitened_tied_embedding() -> None:
    """With ``token_counts``, whiten minimises ``Σ_i (n_i + 1) · Δ_i C Δ_iᵀ``: the planned error is
    that objective's relative tail, and frequent rows are kept better than without counts."""
    from factorlm.planning import lookup_weight

    counts = np.zeros(96)
    counts[:8] = 1000.0  # eight frequent tokens, the rest never seen
    gram = _gram(32, 1)
    stats = _Stats(gram={"embed.weight": gram, "dense.weight": _gram(32, 2)})
    stats.token_counts = {"embed.weight": counts}
    assert lookup_weight(stats, "embed.weight") == pytest.approx(counts + 1.0)
    assert lookup_weight(stats, "dense.weight") is None
    assert lookup_weight(None, "embed.weight") is None
    analysis = _analysis("transpose")
    kwargs = {"ratio": 0.5, "rank_multiple": 4, "embeddings": 0.5}
    weighted = make_plan(analysis, method="whiten", stats=stats, **kwargs)  # type: ignore[arg-type]
    entry = weighted.weights["embed.weight"]
    weight = numpy_helper.to_array(
        next(t for t in embedding_lm(vocab=96, d=32).graph.initializer if t.name == "embed.weight")
    ).astype(np.float64)
    # The objective's singular values: of C^½ Eᵀ diag(√(n + 1)), with any square root of C.
    root = np.linalg.cholesky(gram).T
    s = np.linalg.svd(root @ weight.T * np.sqrt(counts + 1.0), compute_uv=False)
    rank = int(entry.rank or 0)
    assert entry.expected_error == pytest.approx(np.sqrt((s[rank:] ** 2).sum() / (s**2).sum()))
    stats.token_counts = {}
    plain = make_plan(analysis, method="whiten", stats=stats, **kwargs)  # type: ignore[arg-type]
    assert plain.weights["embed.weight"].expected_error != pytest.approx(entry.expected_error)
