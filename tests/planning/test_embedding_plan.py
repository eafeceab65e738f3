"""Token embeddings are planned at their own ratio; a tied LM head shares the entry and its FLOPs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from factorlm.passes import Analysis, analyze
from factorlm.planning import make_plan
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
