"""Grid expansion: the product of the axes in order, stable ids, and which trials seed which."""

from __future__ import annotations

from pathlib import Path

from factorlm.sweeps import parse_sweep, plan_seeds
from factorlm.sweeps.shared import StartPoints, plan_shared

BASE = {"model": "/m", "data": {"path": "/d.jsonl"}}


def test_grid_is_the_product_in_axis_order(tmp_path: Path) -> None:
    config = parse_sweep(
        {
            "base": BASE,
            "output_dir": "out",
            "axes": {"compress.method": ["svd", "whiten"], "compress.ratio": [0.5, 0.6, 0.7]},
        },
        root=tmp_path,
    )
    trials = config.trials()
    assert [tuple(t.params.values()) for t in trials] == [
        (m, r) for m in ("svd", "whiten") for r in (0.5, 0.6, 0.7)
    ]
    for t in trials:
        assert t.config.compress.method == t.params["compress.method"]
        assert t.config.compress.ratio == t.params["compress.ratio"]
        assert t.output_dir == tmp_path / "out" / "trials" / t.id
        assert len(t.id) == 10 and all(c in "0123456789abcdef" for c in t.id)
    assert len({t.id for t in trials}) == 6


def test_ids_are_stable_and_follow_the_whole_config(tmp_path: Path) -> None:
    def ids(axes: dict[str, list[object]], base: dict[str, object] = BASE) -> dict[str, str]:
        config = parse_sweep({"base": base, "axes": axes}, root=tmp_path)
        return {repr(sorted(t.params.items())): t.id for t in config.trials()}

    one = ids({"compress.method": ["svd", "whiten"], "compress.ratio": [0.5]})
    again = ids({"compress.ratio": [0.5], "compress.method": ["whiten", "svd"]})
    assert one == again  # axis and value order do not change a trial's id
    other_out = parse_sweep(
        {"base": BASE, "axes": {"compress.ratio": [0.5]}, "output_dir": "elsewhere"},
        root=tmp_path,
    ).trials()[0]
    assert other_out.id == ids({"compress.ratio": [0.5]})["[('compress.ratio', 0.5)]"]
    changed = ids({"compress.method": ["svd", "whiten"], "compress.ratio": [0.5]},
                  {**BASE, "calibration": {"max_length": 64}})  # fmt: skip
    assert not set(changed.values()) & set(one.values())  # another base: other trials


def test_values_equal_to_the_base_are_one_trial_each(tmp_path: Path) -> None:
    config = parse_sweep(
        {"base": BASE, "axes": {"build.int8": [False, True], "compress.joint_qkv": [True]}},
        root=tmp_path,
    )
    assert len(config.trials()) == 2


def test_seeds_share_inputs_and_statistics(tmp_path: Path) -> None:
    config = parse_sweep(
        {
            "base": BASE,
            "axes": {
                "compress.method": ["svd", "whiten", "fwsvd"],
                "compress.ratio": [0.5, 0.7],
                "calibration.max_length": [32, 64],
            },
        },
        root=tmp_path,
    )
    trials = config.trials()
    seeds = plan_seeds(trials)
    by = {(t.params["compress.method"], t.params["compress.ratio"],
           t.params["calibration.max_length"]): t.id for t in trials}  # fmt: skip
    leader = by[("svd", 0.5, 32)]
    assert seeds[leader] is None
    # svd does not calibrate: max_length does not split it; it reuses the first trial's stages
    assert seeds[by[("svd", 0.7, 64)]] == leader
    # the first whiten trial of each max_length starts from the leader, the others from it
    first_whiten = by[("whiten", 0.5, 32)]
    assert seeds[first_whiten] == leader
    assert seeds[by[("whiten", 0.7, 32)]] == first_whiten
    assert seeds[by[("whiten", 0.7, 64)]] == by[("whiten", 0.5, 64)]
    assert seeds[by[("fwsvd", 0.7, 32)]] == by[("fwsvd", 0.5, 32)]  # Fisher differs from Grams
    # no cycles: following seeds always ends at the leader
    for t in trials:
        ident: str | None = t.id
        for _ in range(len(trials)):
            if ident is None:
                break
            ident = seeds[ident]
        assert ident is None


def test_shared_job_feeds_every_trial_that_needs_no_more(tmp_path: Path) -> None:
    """One shared job per input group: its first trial, the trials that calibrate nothing and each
    calibration's first trial start from it; the other calibrated trials wait for their
    calibration's first trial, as before."""
    config = parse_sweep(
        {
            "base": BASE,
            "axes": {"compress.method": ["svd", "whiten", "fwsvd"], "compress.ratio": [0.5, 0.7]},
        },
        root=tmp_path,
    )
    trials = config.trials()
    seeds = plan_seeds(trials)
    jobs, redirect = plan_shared(trials, seeds, tmp_path)
    by = {(t.params["compress.method"], t.params["compress.ratio"]): t.id for t in trials}
    assert len(jobs) == 1
    (job,) = jobs.values()
    assert job.folder.parent == tmp_path / "shared"
    assert job.config["output_dir"] == str(job.folder)
    firsts = [by[("svd", 0.5)], by[("svd", 0.7)], by[("whiten", 0.5)], by[("fwsvd", 0.5)]]
    assert sorted(job.trials) == sorted(firsts)
    assert all(redirect[t] == job.id for t in firsts)
    # the second whiten and fwsvd trials reuse their calibration's first trial
    for method in ("whiten", "fwsvd"):
        follower = by[(method, 0.7)]
        assert follower not in redirect and seeds[follower] == by[(method, 0.5)]
    # a lone trial has nobody to share with: no job
    single = parse_sweep({"base": BASE, "axes": {"compress.ratio": [0.5]}}, root=tmp_path / "one")
    assert plan_shared(single.trials(), plan_seeds(single.trials()), tmp_path / "one") == ({}, {})


def test_shared_job_when_the_first_trial_calibrates(tmp_path: Path) -> None:
    """A first trial that calibrates keeps its calibration's followers waiting for it."""
    config = parse_sweep(
        {
            "base": BASE,
            "axes": {"compress.method": ["whiten", "svd"], "compress.ratio": [0.5, 0.7]},
        },
        root=tmp_path,
    )
    trials = config.trials()
    seeds = plan_seeds(trials)
    _, redirect = plan_shared(trials, seeds, tmp_path)
    by = {(t.params["compress.method"], t.params["compress.ratio"]): t.id for t in trials}
    leader = by[("whiten", 0.5)]
    assert redirect[leader] == redirect[by[("svd", 0.5)]] == redirect[by[("svd", 0.7)]]
    assert by[("whiten", 0.7)] not in redirect and seeds[by[("whiten", 0.7)]] == leader


def test_a_failed_shared_job_falls_back_to_the_seeds(tmp_path: Path) -> None:
    """Trials of a shared job wait for it; when it failed, the first trial starts bare and the
    others wait for it, instead of all starting bare at once."""
    config = parse_sweep(
        {
            "base": BASE,
            "axes": {"compress.method": ["svd", "whiten"], "compress.ratio": [0.5, 0.7]},
        },
        root=tmp_path,
    )
    trials = config.trials()
    seeds = plan_seeds(trials)
    jobs, redirect = plan_shared(trials, seeds, tmp_path)
    (job,) = jobs.values()
    done: set[str] = set()
    starts = StartPoints(
        jobs,
        redirect,
        seeds,
        {t.id: t.output_dir for t in trials},
        finished=done.__contains__,
        job_ok=dict.fromkeys(jobs),
    )
    by = {(t.params["compress.method"], t.params["compress.ratio"]): t for t in trials}
    leader, follower = by[("svd", 0.5)], by[("svd", 0.7)]
    assert starts.of(leader.id) == (False, None) == starts.of(follower.id)  # job running
    starts.job_ok[job.id] = True
    assert starts.of(follower.id) == (True, str(job.folder))
    starts.job_ok[job.id] = False
    assert starts.of(leader.id) == (True, None)  # bare: it meets the job's error itself
    assert starts.of(follower.id) == (False, str(leader.output_dir))  # waits for the leader
    done.add(leader.id)
    assert starts.of(follower.id) == (True, str(leader.output_dir))
    # a trial that reuses a calibration never waited for the job at all
    second_whiten = by[("whiten", 0.7)]
    assert second_whiten.id not in redirect
    assert starts.of(second_whiten.id) == (False, str(by[("whiten", 0.5)].output_dir))


def test_fisher_samples_split_only_gradient_calibrations(tmp_path: Path) -> None:
    """``calibration.fisher_samples`` bounds the Fisher passes: whiten trials that differ only in
    it share one calibration, fwsvd trials do not."""
    config = parse_sweep(
        {
            "base": BASE,
            "axes": {
                "compress.method": ["whiten", "fwsvd"],
                "calibration.fisher_samples": [64, 128],
            },
        },
        root=tmp_path,
    )
    trials = config.trials()
    seeds = plan_seeds(trials)
    by = {(t.params["compress.method"], t.params["calibration.fisher_samples"]): t.id
          for t in trials}  # fmt: skip
    assert seeds[by[("whiten", 128)]] == by[("whiten", 64)]
    assert seeds[by[("fwsvd", 128)]] != by[("fwsvd", 64)]
    whiten = next(t.config for t in trials if t.id == by[("whiten", 64)])
    assert "fisher_samples" not in whiten.calibration_settings()
    fisher = next(t.config for t in trials if t.id == by[("fwsvd", 64)])
    assert fisher.calibration_settings()["fisher_samples"] == 64
