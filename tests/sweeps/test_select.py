"""The selection rule and the Pareto front on synthetic trial results, and the result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from factorlm.pipeline.config import load_config
from factorlm.sweeps import SelectRule, TrialResult, pareto_front, parse_sweep, select
from factorlm.sweeps.report import write_results


def acc(ident: str, quality: float, speedup: float, drop: float = 0.0) -> TrialResult:
    return TrialResult(
        id=ident,
        params={"compress.ratio": 0.5},
        status="done",
        metric="accuracy_percent",
        higher_is_better=True,
        quality=quality,
        reference_quality=90.0,
        drop=drop,
        drop_unit="points",
        speedup=speedup,
    )


def ppl(ident: str, perplexity: float, speedup: float) -> TrialResult:
    return TrialResult(
        id=ident, params={}, status="done", metric="perplexity", higher_is_better=False,
        quality=perplexity, speedup=speedup,
    )  # fmt: skip


FAILED = TrialResult(id="f", params={}, status="failed", error="ConfigError: boom")
TRIALS = [
    acc("a", 89.0, 1.1, 1.0),
    acc("b", 88.0, 1.6, 2.0),
    acc("c", 85.0, 2.2, 5.0),
    acc("d", 84.0, 1.5, 6.0),  # dominated by b (slower and worse)
    acc("e", 88.0, 1.4, 2.0),  # dominated by b (same quality, slower)
    FAILED,
]


def test_pareto_front_keeps_only_undominated_trials() -> None:
    assert [r.id for r in pareto_front(TRIALS)] == ["c", "b", "a"]
    # lower-is-better metrics are flipped: perplexity 10 at 2x beats 12 at 1.5x
    front = pareto_front([ppl("p", 10.0, 2.0), ppl("q", 12.0, 1.5), ppl("r", 9.0, 1.0)])
    assert [r.id for r in front] == ["p", "r"]


@pytest.mark.parametrize(
    ("rule", "best"),
    [
        ({"maximize": "quality"}, "a"),
        ({"maximize": "accuracy", "subject_to": {"min_speedup": 1.5}}, "b"),
        ({"maximize": "speedup", "subject_to": {"max_drop": 2.0}}, "b"),
        ({"maximize": "speedup"}, "c"),
        ({"minimize": "drop", "subject_to": {"min_speedup": 2.0}}, "c"),
        ({"pareto": True}, "a"),
        ({"pareto": True, "subject_to": {"min_speedup": 1.5}}, "b"),
        ({"maximize": "quality", "subject_to": {"min_accuracy": 86, "min_speedup": 1.2}}, "b"),
    ],
)
def test_rule_picks_the_expected_trial(rule: dict[str, object], best: str) -> None:
    selection = select(TRIALS, SelectRule.model_validate(rule))
    assert selection.best is not None and selection.best.id == best
    assert "f" not in {r.id for r in selection.feasible}


def test_no_trial_meets_the_rule() -> None:
    selection = select(TRIALS, SelectRule(maximize="quality", subject_to={"min_speedup": 3.0}))
    assert selection.best is None and selection.feasible == []
    assert "no trial meets the rule (maximize quality subject to min_speedup=3.0)" in (
        selection.reason
    )
    assert "5 of 6 trials finished" in selection.reason
    # a perplexity rule finds no perplexity among classification trials
    assert select(TRIALS, SelectRule(minimize="perplexity")).best is None
    assert select([FAILED], SelectRule(pareto=True)).best is None


def test_perplexity_is_minimized() -> None:
    trials = [ppl("p", 10.0, 2.0), ppl("q", 12.0, 1.5), ppl("r", 9.0, 1.0)]
    rule = SelectRule(minimize="perplexity", subject_to={"max_perplexity": 11.0})
    assert select(trials, rule).best.id == "r"  # type: ignore[union-attr]
    assert select(trials, SelectRule(maximize="quality")).best.id == "r"  # type: ignore[union-attr]
    rule = SelectRule(maximize="quality", subject_to={"min_speedup": 1.5})
    assert select(trials, rule).best.id == "p"  # type: ignore[union-attr]


def test_ties_go_to_the_faster_trial() -> None:
    trials = [acc("x", 88.0, 1.2), acc("y", 88.0, 1.9), acc("z", 88.0, 1.9)]
    assert select(trials, SelectRule(maximize="quality")).best.id == "y"  # type: ignore[union-attr]


def test_results_files_and_best_yaml_round_trip(tmp_path: Path) -> None:
    config = parse_sweep(
        {
            "base": {"model": "/m", "data": {"path": "/d.jsonl"}},
            "output_dir": "out",
            "axes": {"compress.ratio": [0.5, 0.6, 0.7]},
        },
        root=tmp_path,
    )
    trials = config.trials()
    results = [
        acc(trials[0].id, 89.0, 1.1),
        acc(trials[1].id, 88.0, 1.6),
        TrialResult(id=trials[2].id, params=trials[2].params, status="failed", error="E: x|y"),
    ]
    for t, r in zip(trials, results, strict=True):
        r.params = dict(t.params)
    selection = select(results, SelectRule(maximize="quality", subject_to={"min_speedup": 1.5}))
    header = {"source": "s.yaml", "nodes": 2, "wall_seconds": 1.0,
              "counts": {"total": 3, "done": 2, "failed": 1, "resumed": 0}}  # fmt: skip
    root = tmp_path / "out"
    root.mkdir()
    paths = write_results(root, header, trials, results, selection)
    data = json.loads(paths["json"].read_text())
    assert data["selection"]["best"] == trials[1].id
    assert data["selection"]["pareto_front"] == [trials[1].id]
    assert [t["status"] for t in data["trials"]] == ["done", "done", "failed"]
    md = paths["md"].read_text()
    assert "| trial | compress.ratio | accuracy_percent | drop | speedup | pareto | status |" in md
    assert "**best**" in md and "failed: E: x\\|y" in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best_text = paths["best"].read_text()
    assert best_text.startswith(f"# Best trial {trials[1].id}")
    best = load_config(paths["best"])  # a ready `factorlm run` config
    assert best.compress.ratio == 0.6
    assert best.output_dir == root / "best-run"
    assert best.model_dump(exclude={"output_dir"}) == trials[1].config.model_dump(
        exclude={"output_dir"}
    )
    assert yaml.safe_load(best_text)["data"]["path"] == "/d.jsonl"
    # rerun with no best: a stale best.yaml is removed
    none = select(results, SelectRule(maximize="quality", subject_to={"min_speedup": 9}))
    paths = write_results(root, header, trials, results, none)
    assert "best" not in paths and not (root / "best.yaml").exists()
