"""Recovery: plan applied to PyTorch equals the graph passes, resume is exact, CLI and methods."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from factorlm.cli import app, main
from factorlm.compress import compress
from factorlm.errors import ConfigError
from factorlm.exporters.hf import _load_torch_model, export
from factorlm.passes.analysis import FACTOR_METADATA_KEY
from factorlm.recovery import TrainConfig, apply_plan, recover, train
from factorlm.recovery.export import export_student
from factorlm.recovery.modules import LowRankSparseLinear

TEXTS = [
    "the film is a good movie",
    "a bad plot and an awful actor",
    "the story is funny and clever",
    "long boring sad movie",
    "the best actor in the worst film",
    "a quiet short story",
    "loud awful movie the plot is bad",
    "great film great story",
]
TASK = "text-classification"


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("recovery") / "onnx"
    export(tiny_bert_dir, out, task=TASK, progress=False)
    return out


def _feeds() -> dict[str, np.ndarray]:
    ids = np.array([[2, 4, 5, 6, 7, 8, 9, 3], [2, 10, 11, 12, 3, 0, 0, 0]], dtype=np.int64)
    return {
        "input_ids": ids,
        "attention_mask": (ids != 0).astype(np.int64),
        "token_type_ids": np.zeros_like(ids),
    }


def _run(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, _feeds())[0])


def _compressed(tmp: Path, onnx_dir: Path, method: str, **kwargs: Any) -> Any:
    return compress(
        onnx_dir / "model.onnx", tmp / "c" / "model.onnx", method=method, ratio=0.6,
        rank_multiple=4, min_size=0, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("svd", {}),
        ("svd", {"embeddings": 0.5}),
        ("kron", {}),
        ("losparse", {"sparse_structure": "column", "sparse_density": 0.1}),
        ("losparse", {"sparse_structure": "unstructured", "sparse_density": 0.1}),
    ],
)
def test_applied_plan_exports_what_the_passes_produce(
    tmp_path: Path, tiny_bert_dir: Path, onnx_dir: Path, method: str, kwargs: dict[str, Any]
) -> None:
    result = _compressed(tmp_path, onnx_dir, method, **kwargs)
    assert result.factorized > 0
    model = _load_torch_model(tiny_bert_dir, TASK, False)
    applied = apply_plan(model, result.plan_path, onnx_dir / "model.onnx")
    assert set(applied.modules) == set(result.plan.weights)
    factors = {
        n: [t.detach().numpy().copy() for t in model.get_submodule(p).factor_tensors()]
        for n, p in applied.modules.items()
    }
    info = export_student(model, tiny_bert_dir, tmp_path / "student", TASK, factors)
    expected, got = _run(tmp_path / "c" / "model.onnx"), _run(tmp_path / "student" / "model.onnx")
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    tags = json.loads(
        {
            p.key: p.value
            for p in onnx.load(str(tmp_path / "student" / "model.onnx")).metadata_props
        }[FACTOR_METADATA_KEY]
    )
    assert info["tagged_factors"] == len(tags) > 0
    assert set(tags.values()) == set(result.plan.weights)
    # The passes leave the tagged factors alone: nothing left to factorize among them.
    again = compress(
        tmp_path / "student" / "model.onnx", tmp_path / "again.onnx", method="svd", ratio=0.6,
        rank_multiple=4, min_size=0,
    )  # fmt: skip
    assert not set(again.plan.weights) & set(tags)


def test_whitened_plan_with_stats_matches(
    tmp_path: Path, tiny_bert_dir: Path, onnx_dir: Path
) -> None:
    from factorlm.calibration import collect_statistics

    stats = collect_statistics(
        onnx_dir / "model.onnx", TEXTS * 4, cache_dir=tmp_path / "cache", progress=False
    )
    result = _compressed(tmp_path, onnx_dir, "whiten", stats=stats)
    model = _load_torch_model(tiny_bert_dir, TASK, False)
    applied = apply_plan(model, result.plan, onnx_dir / "model.onnx", stats=stats)
    factors = {
        n: [t.detach().numpy().copy() for t in model.get_submodule(p).factor_tensors()]
        for n, p in applied.modules.items()
    }
    export_student(model, tiny_bert_dir, tmp_path / "student", TASK, factors)
    expected, got = _run(tmp_path / "c" / "model.onnx"), _run(tmp_path / "student" / "model.onnx")
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def _student(tiny_bert_dir: Path, onnx_dir: Path, plan: Any) -> tuple[Any, Any, Any]:
    from transformers import AutoTokenizer

    teacher = _load_torch_model(tiny_bert_dir, TASK, False)
    student = _load_torch_model(tiny_bert_dir, TASK, False)
    apply_plan(student, plan, onnx_dir / "model.onnx")
    return student, teacher, AutoTokenizer.from_pretrained(tiny_bert_dir)


def test_interrupted_run_resumes_to_identical_weights(
    tmp_path: Path, tiny_bert_dir: Path, onnx_dir: Path
) -> None:
    plan = _compressed(tmp_path, onnx_dir, "svd").plan
    cfg = TrainConfig(steps=6, batch_size=3, lr=1e-3, checkpoint_every=2, feature_fraction=0.5)
    student, teacher, tok = _student(tiny_bert_dir, onnx_dir, plan)
    straight = train(student, teacher, tok, TEXTS, cfg, tmp_path / "a", progress=False)
    assert straight.steps_done == 6 and straight.losses[-1][1] < straight.losses[3][1] * 10

    class Interrupt(Exception):
        pass

    def stop(step: int, loss: float) -> None:
        if step == 3:  # after step 3; the last checkpoint holds step 2
            raise Interrupt

    student2, teacher2, _ = _student(tiny_bert_dir, onnx_dir, plan)
    with pytest.raises(Interrupt):
        train(student2, teacher2, tok, TEXTS, cfg, tmp_path / "b", progress=False, on_step=stop)
    student3, teacher3, _ = _student(tiny_bert_dir, onnx_dir, plan)
    resumed = train(
        student3, teacher3, tok, TEXTS, cfg, tmp_path / "b", resume=True, progress=False
    )
    assert resumed.resumed_from == 2 and resumed.steps_done == 6
    a, b = student.state_dict(), student3.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [x for _, x in straight.losses] == [x for _, x in resumed.losses]
    with pytest.raises(ConfigError, match="was made with steps=6"):
        other = TrainConfig(steps=8, batch_size=3, lr=1e-3, checkpoint_every=2)
        train(student3, teacher3, tok, TEXTS, other, tmp_path / "b", resume=True, progress=False)


def test_distillation_reduces_the_gap(tmp_path: Path, tiny_bert_dir: Path, onnx_dir: Path) -> None:
    plan = _compressed(tmp_path, onnx_dir, "svd").plan
    student, teacher, tok = _student(tiny_bert_dir, onnx_dir, plan)
    cfg = TrainConfig(steps=40, batch_size=4, lr=3e-3, feature_fraction=0.0, checkpoint_every=40)
    result = train(student, teacher, tok, TEXTS, cfg, tmp_path / "ck", progress=False)
    first = float(np.mean([x for _, x in result.losses[:4]]))
    last = float(np.mean([x for _, x in result.losses[-4:]]))
    assert last < 0.5 * first


def test_losparse_prunes_to_the_plan_density(
    tmp_path: Path, tiny_bert_dir: Path, onnx_dir: Path
) -> None:
    plan = _compressed(
        tmp_path, onnx_dir, "losparse", sparse_structure="unstructured", sparse_density=0.1
    ).plan
    student, teacher, tok = _student(tiny_bert_dir, onnx_dir, plan)
    cfg = TrainConfig(method="losparse", steps=10, batch_size=4, lr=1e-3, checkpoint_every=10)
    train(student, teacher, tok, TEXTS, cfg, tmp_path / "ck", progress=False)
    modules = [m for m in student.modules() if isinstance(m, LowRankSparseLinear)]
    assert modules
    for m in modules:
        nnz = int((m.sparse != 0).sum())
        assert nnz <= round(m.density * m.sparse.numel())
        assert torch.equal(m.sparse * m.mask, m.sparse)


@pytest.mark.parametrize(
    "method,compress_method,kwargs",
    [
        ("dsee", "svd", {}),
        ("kron-kd", "kron", {}),
        ("safe", "svd", {"embeddings": 0.5}),
        ("losparse", "losparse", {"sparse_structure": "column", "sparse_density": 0.1}),
    ],
)
def test_methods_end_to_end(
    tmp_path: Path,
    tiny_bert_dir: Path,
    onnx_dir: Path,
    method: str,
    compress_method: str,
    kwargs: dict[str, Any],
) -> None:
    result = _compressed(tmp_path, onnx_dir, compress_method, **kwargs)
    out = recover(
        tiny_bert_dir, result.plan_path, tmp_path / "out", method=method, data=TEXTS, steps=4,
        batch_size=4, onnx_model=onnx_dir / "model.onnx", progress=False,
    )  # fmt: skip
    assert out.steps_done == 4 and out.model.is_file() and out.tagged_factors > 0
    assert out.max_relative_diff < 1e-3
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    record = json.loads((tmp_path / "out" / "recovery.json").read_text())
    assert record["method"] == method and record["steps_done"] == 4
    assert _run(out.model).shape == (2, 2)


def _cli(argv: list[str]) -> int:
    if not any(getattr(c, "name", None) == "recover" for c in app.registered_commands):
        from factorlm.commands.recover import register

        register(app)
    return main(argv)


def test_cli_recover_and_resume(tmp_path: Path, tiny_bert_dir: Path, onnx_dir: Path) -> None:
    result = _compressed(tmp_path, onnx_dir, "svd")
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    args = [
        "recover", str(tiny_bert_dir), "--plan", str(result.plan_path), "--data", str(data),
        "-o", str(tmp_path / "out"), "--steps", "4", "--batch-size", "4",
        "--onnx", str(onnx_dir / "model.onnx"), "--checkpoint-every", "2",
    ]  # fmt: skip
    assert _cli(args) == 0
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert (tmp_path / "out.checkpoints" / "checkpoint.pt").is_file()
    assert _cli(args) == 2  # the output exists
    assert _cli([*args, "--resume", "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "recovery.json").read_text())["resumed_from"] == 4


def test_cli_refusals(
    tmp_path: Path, tiny_bert_dir: Path, onnx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _compressed(tmp_path, onnx_dir, "svd")
    base = [
        "recover", str(tiny_bert_dir), "--plan", str(result.plan_path), "--data",
        str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out"),
    ]  # fmt: skip
    assert _cli(base) == 2
    assert "does not exist" in capsys.readouterr().err
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(TEXTS))
    base[5] = str(texts)
    assert _cli([*base, "--method", "magic"]) == 2
    assert "method 'magic' is unknown" in capsys.readouterr().err
    assert _cli([*base, "--time-budget", "soon"]) == 2
    assert "not a positive duration" in capsys.readouterr().err
    assert _cli([*base, "--method", "kron-kd"]) == 2
    assert "--method kron" in capsys.readouterr().err
    assert _cli([*base, "--resume", "--onnx", str(onnx_dir / "model.onnx")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_parse_duration() -> None:
    from factorlm.commands.recover import parse_duration

    assert parse_duration("15m") == 900 and parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400 and parse_duration("30") == 30
