"""Calibration on Ray within the Gram budget, against the local passes, on the tiny Llama.

The tiny Llama has nine input groups (four per layer and the LM head, which is tied to the
embedding, so the looked-up token ids are counted too). A small ``gram_budget`` cuts them into
chunks: each Ray task computes one chunk over one shard of the texts, and the driver spills
each chunk's Grams before it fetches the next chunk's. The test cluster has two CPUs, so
several chunks get one shard each; the sharded case pretends the cluster has four.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from factorlm.calibration import CalibrationStats, collect_statistics
from tiny_vocab import LONG_TEXTS

TEXTS = LONG_TEXTS * 4  # 6 batches of 4: the held-back one (index 3) opens the second shard
SETTINGS: dict[str, Any] = {"batch_size": 4, "max_length": 16, "holdout": True, "progress": False}
#: Per group, float64 Gram and held-back Gram: 2 x 8 x width^2 (width 64, or 128 for down_proj).
SMALL, DOWN = 2 * 8 * 64**2, 2 * 8 * 128**2


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, tiny_llama_past: Path) -> CalibrationStats:
    """The local statistics in passes of at most one down_proj Gram (spilled to memory maps)."""
    cache = tmp_path_factory.mktemp("local-calibration")
    stats = collect_statistics(
        tiny_llama_past, TEXTS, cache_dir=cache, gram_budget=DOWN, **SETTINGS
    )
    assert any(isinstance(g, np.memmap) for g in stats.gram.values())
    return stats


def _ray(
    address: str,
    model: Path,
    cache: Path,
    budget: int | Literal["none"],
    caplog: pytest.LogCaptureFixture,
) -> tuple[CalibrationStats, str]:
    """Ray's statistics and its plan line ("... N pass(es) of M shard(s)")."""
    caplog.clear()
    caplog.set_level(logging.INFO, logger="factorlm.calibration.capture")
    stats = collect_statistics(
        model, TEXTS, cache_dir=cache, ray_address=address, gram_budget=budget, **SETTINGS
    )
    (line,) = [r.getMessage() for r in caplog.records if "Ray workers" in r.getMessage()]
    return stats, line


def _compare(remote: CalibrationStats, local: CalibrationStats, rtol: float) -> None:
    """Every table of ``remote`` equals ``local``'s (value for value when ``rtol`` is 0)."""
    assert remote.tokens == local.tokens and remote.heldout_tokens == local.heldout_tokens > 0
    assert remote.token_counts.keys() == local.token_counts.keys() and local.token_counts
    for name, counts in local.token_counts.items():
        np.testing.assert_array_equal(remote.token_counts[name], counts)
    for table in ("gram", "gram_heldout", "mean_abs"):
        mine, theirs = getattr(local, table), getattr(remote, table)
        assert list(theirs) == list(mine) and len(mine) >= 9
        for name, value in mine.items():
            if rtol == 0:
                np.testing.assert_array_equal(theirs[name], value, err_msg=f"{table} {name}")
            else:
                scale = np.abs(value).max()
                np.testing.assert_allclose(theirs[name], value, rtol=rtol, atol=rtol * scale)


def test_ray_passes_of_one_task_each_are_the_local_passes(
    ray_cluster: Any,
    tiny_llama_past: Path,
    local: CalibrationStats,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """2 CPUs, 3 x DOWN bytes: each chunk gets DOWN (2 tasks in flight and the driver's one),
    so there are more chunks than CPUs and each is one task over all texts, summed in the local
    order: the statistics equal the local passes' value for value, Grams spilled."""
    remote, line = _ray(ray_cluster.address, tiny_llama_past, tmp_path, 3 * DOWN, caplog)
    assert "of 1 shard(s)" in line and "(6 batches; 1 pass" not in line
    assert all(isinstance(g, np.memmap) for g in remote.gram.values())
    # copied out of the object store: a view would keep the chunk's whole result there
    assert all(counts.flags.writeable for counts in remote.token_counts.values())
    _compare(remote, local, rtol=0)


def test_ray_sharded_passes_add_up_to_the_local_passes(
    ray_cluster: Any,
    tiny_llama_past: Path,
    local: CalibrationStats,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cluster that says it has 4 CPUs (2 run at once): 5 x (DOWN + 4 x SMALL) bytes give
    chunks of half the groups, 2 chunks of 2 shards each; the held-back batch opens the second
    shard. Equal to the local passes up to the rounding of the sum across shards."""
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    budget = 5 * (2 * DOWN + 4 * SMALL)
    remote, line = _ray(ray_cluster.address, tiny_llama_past, tmp_path, budget, caplog)
    assert "2 pass(es) of 2 shard(s)" in line
    _compare(remote, local, rtol=1e-10)


def test_ray_without_a_budget_is_data_parallel(
    ray_cluster: Any,
    tiny_llama_past: Path,
    local: CalibrationStats,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``gram_budget="none"``: one pass, each of the 2 tasks holding every Gram over half the
    texts, added in shard order (up to rounding)."""
    remote, line = _ray(ray_cluster.address, tiny_llama_past, tmp_path, "none", caplog)
    assert "on 2 Ray workers (6 batches; 1 pass(es) of 2 shard(s))" in line
    _compare(remote, local, rtol=1e-10)
