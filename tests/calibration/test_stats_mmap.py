"""Memory-mapped calibration statistics read the same numbers and give their pages back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from factorlm.calibration.stats import CalibrationStats, drop_mapped_pages, paged_statistics


def _stats() -> CalibrationStats:
    rng = np.random.default_rng(0)
    return CalibrationStats(
        gram={"w/a": rng.standard_normal((64, 64)), "w.b": rng.standard_normal((16, 16))},
        mean_abs={"w/a": rng.random(64), "w.b": rng.random(16)},
        fisher={"w/a": np.asfortranarray(rng.random((8, 4)))},
        tokens=123,
    )


def test_mapped_statistics_equal_the_loaded_ones(tmp_path: Path) -> None:
    path = _stats().save(tmp_path / "stats.npz")
    plain, mapped = CalibrationStats.load(path), CalibrationStats.load(path, mmap=True)
    assert mapped.tokens == plain.tokens == 123
    for kind in ("gram", "mean_abs", "fisher"):
        for name, array in getattr(plain, kind).items():
            view = getattr(mapped, kind)[name]
            assert view.dtype == array.dtype and view.shape == array.shape
            np.testing.assert_array_equal(view, array)
            assert not view.flags.writeable  # a view of the file, never written
    assert drop_mapped_pages(mapped) == 1  # one map behind every array
    assert drop_mapped_pages(plain) == 0
    np.testing.assert_array_equal(mapped.gram["w/a"], plain.gram["w/a"])  # read again


def test_paged_statistics_look_up_the_same_arrays(tmp_path: Path) -> None:
    path = _stats().save(tmp_path / "stats.npz")
    plain = CalibrationStats.load(path)
    assert paged_statistics(plain) is plain
    paged = paged_statistics(CalibrationStats.load(path, mmap=True))
    for name in ("w/a", "w.b"):
        np.testing.assert_array_equal(paged.gram[name], plain.gram[name])
    assert set(paged.gram) == {"w/a", "w.b"}
    with pytest.raises(KeyError):
        paged.gram["missing"]
