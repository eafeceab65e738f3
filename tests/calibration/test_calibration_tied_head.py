"""Calibration targets of an LM head tied to the token embedding through a Transpose."""

from __future__ import annotations

from factorlm.calibration import Target, find_targets
from models import embedding_lm


def test_a_head_read_through_a_transpose_is_a_target_keyed_by_the_embedding() -> None:
    """``MatMul(h, Transpose(E))`` gives ``E`` the head's input (h, width 32) with tied_heads;
    without it only plain MatMul/Gemm weights are targets (what the Fisher mapping expects)."""
    model = embedding_lm(vocab=96, d=32, tie="transpose")
    plain = {t.weight for t in find_targets(model)}
    assert plain == {"dense.weight"}
    tied = {t.weight: t for t in find_targets(model, tied_heads=True)}
    assert tied["embed.weight"] == Target("embed.weight", "h", False, 32, 96)
    assert set(tied) == {"dense.weight", "embed.weight"}
    assert [t.weight for t in find_targets(model, ["embed.weight"], tied_heads=True)] == [
        "embed.weight"
    ]
    # Gemm(h, E; transB=1) reads E itself: a target either way, with the same orientation.
    gemm = {t.weight: t for t in find_targets(embedding_lm(vocab=96, d=32, tie="gemm"))}
    assert (gemm["embed.weight"].in_features, gemm["embed.weight"].out_features) == (32, 96)
    untied = {t.weight for t in find_targets(embedding_lm(tie="none"), tied_heads=True)}
    assert untied == {"dense.weight", "head.weight"}
