"""Per-stage peak RSS: a stage's own peak (not the process's), and memory given back after it."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from factorlm.pipeline.memory import StagePeak, process_peak_mib, release_memory, rss_mib

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _touch(mib: int) -> float:
    block = np.ones(mib * 2**20 // 8)  # written: resident
    return float(block[::4096].sum())


def test_a_later_smaller_stage_reports_its_own_peak() -> None:
    with StagePeak() as big:
        _touch(200)
    with StagePeak() as small:
        _touch(20)
    big_rec, small_rec = big.record(), small.record()
    assert big_rec["peak_rss_mib"] - big_rec["start_rss_mib"] >= 190
    # The second stage's peak is its own, far below the first stage's.
    assert small_rec["peak_rss_mib"] - small_rec["start_rss_mib"] < 100
    assert small_rec["peak_rss_mib"] < big_rec["peak_rss_mib"] - 100
    assert big_rec["process_peak_rss_mib"] >= big_rec["peak_rss_mib"] - 1
    # What the stage allocated is gone once it ends.
    assert big_rec["end_rss_mib"] < big_rec["start_rss_mib"] + 50
    assert "VmRSS sampled" in big_rec["method"]
    assert process_peak_mib() >= big_rec["peak_rss_mib"] - 1  # survives the VmHWM resets


def test_a_stage_that_resets_the_mark_itself_is_still_measured() -> None:
    with StagePeak(interval_s=0.01) as peak:
        block = np.ones(150 * 2**20 // 8)
        import time

        time.sleep(0.1)  # the sampler sees it
        del block
        release_memory()
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    rec = peak.record()
    assert rec["peak_rss_mib"] - rec["start_rss_mib"] >= 140


def test_rss_reads_proc() -> None:
    now = rss_mib()
    assert now is not None and now > 10
