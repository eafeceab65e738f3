"""Recovery: plan applied to PyTorch equals the graph passes, resume is exact, CLI and methods."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from factorlm.cli import app, main
from factorlm.compression import compress
from factorlm.errors import ConfigError
from factorlm.exporters.hf import export, load_torch_model
from factorlm.passes.analysis import FACTOR_METADATA_KEY
from factorlm.recovery import TrainConfig, apply_plan, recover, train
from factorlm.recovery.export import export_student
from factorlm.recovery.modules import LowRankSparseLinear
from tiny_vocab import TEXTS

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
        ("svd", {"joint_qkv": True}),
    ],
)
def test_applied_plan_exports_what_the_passes_produce(
    tmp_path: Path, tiny_bert_dir: Path, onnx_dir: Path, method: str, kwargs: dict[str, Any]
) -> None:
    result = _compressed(tmp_path, onnx_dir, method, **kwargs)
    assert result.factorized > 0
    model = load_torch_model(tiny_bert_dir, TASK, False)
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
        joint_qkv=False,
    )  # fmt: skip
    assert not set(again.plan.weights) & set(tags)


@pytest.mark.parametrize("joint_qkv", [False, True])
def test_whitened_plan_with_stats_matches(
    tmp_path: Path, tiny_bert_dir: Path, onnx_dir: Path, joint_qkv: bool
) -> None:
    from factorlm.calibration import collect_statistics

    stats = collect_statistics(
        onnx_dir / "model.onnx", TEXTS * 4, cache_dir=tmp_path / "cache", progress=False
    )
    result = _compressed(tmp_path, onnx_dir, "whiten", stats=stats, joint_qkv=joint_qkv)
    assert any("+" in name for name in result.plan.weights) == joint_qkv
    model = load_torch_model(tiny_bert_dir, TASK, False)
    applied = apply_plan(model, result.plan, onnx_dir / "model.onnx", stats=stats)
    factors = {
        n: [t.detach().numpy().copy() for t in model.get_submodule(p).factor_tensors()]
        for n, p in applied.modules.items()
    }
    export_student(model, tiny_bert_dir, tmp_path / "student", TASK, factors)
    expected, got = _run(tmp_path / "c" / "model.onnx"), _run(tmp_path / "student" / "model.onnx")
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def _joint_structure(path: Path) -> tuple[int, int]:
    """(down-projections feeding 3 tagged MatMuls, MatMuls reading a down-projection)."""
    model = onnx.load(str(path))
    tags = json.loads({p.key: p.value for p in model.metadata_props}[FACTOR_METADATA_KEY])
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    downs = ups = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in tags:
            continue
        users = readers.get(node.output[0], [])
        if len(users) == 3 and all(u.op_type == "MatMul" and u.input[1] in tags for u in users):
            downs += 1
            ups += len(users)
    return downs, ups


def test_joint_plan_trains_one_shared_left_factor_and_keeps_attention_fused(
    tmp_path: Path, tiny_bert_dir: Path, onnx_dir: Path
) -> None:
    from factorlm.exporters.ort import build_ort_engine
    from factorlm.recovery.modules import JointFactorizedLinear, JointProjection

    result = _compressed(tmp_path, onnx_dir, "svd", joint_qkv=True)
    (joint,) = [name for name in result.plan.weights if "+" in name]
    student, _, _ = _student(tiny_bert_dir, onnx_dir, result.plan)
    shared = [m for m in student.modules() if isinstance(m, JointFactorizedLinear)]
    views = [m for m in student.modules() if isinstance(m, JointProjection)]
    assert len(shared) == 1 and len(views) == 3 and all(v.joint is shared[0] for v in views)
    rank = result.plan.weights[joint].rank
    assert tuple(shared[0].left.shape) == (16, rank)
    # Each factor is one parameter: the state dict (checkpoints) and optimizer see it once.
    keys = [k for k in student.state_dict() if "attention.self" in k]
    assert sorted(keys) == sorted(
        f"bert.encoder.layer.0.attention.self.joint_query_key_value.{k}"
        for k in ["left", *(f"rights.{i}.{p}" for i in range(3) for p in ("weight", "bias"))]
    )
    out = recover(
        tiny_bert_dir, result.plan_path, tmp_path / "out", data=TEXTS, steps=4, batch_size=4,
        lr=1e-2, onnx_model=onnx_dir / "model.onnx", progress=False,
    )  # fmt: skip
    assert out.steps_done == 4 and out.max_relative_diff < 1e-3
    assert _joint_structure(out.model) == _joint_structure(tmp_path / "c" / "model.onnx") == (1, 3)
    # Trained, so no longer the compressed model; still the fused engine of the compressed one.
    assert not np.allclose(_run(out.model), _run(tmp_path / "c" / "model.onnx"), atol=1e-6)
    compressed = build_ort_engine(tmp_path / "c" / "model.onnx", tmp_path / "ce", optimize=True)
    engine = build_ort_engine(out.model, tmp_path / "engine", optimize=True, model_type="bert")
    fused = {k: v for k, v in engine.fusions["engine"].items() if v}
    assert fused == {k: v for k, v in compressed.fusions["engine"].items() if v}
    assert fused["Attention"] == 1 and fused["EmbedLayerNormalization"] == 1
    assert engine.extra["factor_fusion"]["attention"] == 1
    assert engine.extra["factor_fusion"]["dense"] == []
    np.testing.assert_allclose(_run(engine.engine_path), _run(out.model), atol=1e-4, rtol=0)


def test_joint_plan_with_a_kronecker_method_is_refused(
    tmp_path: Path, tiny_bert_dir: Path, onnx_dir: Path
) -> None:
    from factorlm.errors import PlanError

    plan = _compressed(tmp_path, onnx_dir, "svd", joint_qkv=True).plan
    (joint,) = [name for name in plan.weights if "+" in name]
    entry = plan.weights[joint]
    plan.weights[joint] = dataclasses.replace(
        entry, method="kron", rank=None, kron={"a_shape": [4, 12], "b_shape": [4, 4], "terms": 2}
    )
    model = load_torch_model(tiny_bert_dir, TASK, False)
    with pytest.raises(PlanError, match="is a joint Q/K/V weight; method 'kron'"):
        apply_plan(model, plan, onnx_dir / "model.onnx")


def _student(tiny_bert_dir: Path, onnx_dir: Path, plan: Any) -> tuple[Any, Any, Any]:
    from transformers import AutoTokenizer

    teacher = load_torch_model(tiny_bert_dir, TASK, False)
    student = load_torch_model(tiny_bert_dir, TASK, False)
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
    assert (record["steps"], record["stopped"], record["warning"]) == (4, "steps", None)
    assert _run(out.model).shape == (2, 2)


def _cli(argv: list[str]) -> int:
    if not any(getattr(c, "name", None) == "recover" for c in app.registered_commands):
        from factorlm.cli.recover import register

        register(app)
    return main(argv)


def test_cli_recover_and_resume(tmp_path: Path, tiny_bert_dir: Path, onnx_dir: Path) -> None:
    result = _compressed(tmp_path, onnx_dir, "svd")
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    args = [
        "recover", str(tiny_bert_dir), "--plan", str(result.plan_path), "--data", str(data),
        "-o", str(tmp_path / "out"), "--steps", "4", "--batch-size", "4",
        "--onnx", str(onnx_dir / "model.onnx"), "--checkpoint-every", "2", "--clock", "cpu",
        "--temperature", "1.5", "--feature-fraction", "0.25", "--lm-weight", "0",
    ]  # fmt: skip
    assert _cli(args) == 0
    assert (tmp_path / "out" / "model.onnx").is_file()
    train_cfg = json.loads((tmp_path / "out" / "recovery.json").read_text())["train"]
    assert (train_cfg["clock"], train_cfg["temperature"]) == ("cpu", 1.5)
    assert (train_cfg["feature_fraction"], train_cfg["lm_weight"]) == (0.25, 0.0)
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
    assert "'magic' is not one of 'distill'" in capsys.readouterr().err
    assert _cli([*base, "--time-budget", "soon"]) == 2
    assert "not a positive duration" in capsys.readouterr().err
    assert _cli([*base, "--method", "kron-kd"]) == 2
    assert "--method kron" in capsys.readouterr().err
    assert _cli([*base, "--resume", "--onnx", str(onnx_dir / "model.onnx")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    for flag, value, message in [
        ("--clock", "gpu", "'gpu' is not one of 'wall', 'cpu'."),
        ("--temperature", "0", "--temperature is 0.0; it must be > 0.0."),
        ("--lm-weight", "-1", "--lm-weight is -1.0; it must be >= 0.0."),
        ("--feature-fraction", "1.5", "--feature-fraction is 1.5; it must be >= 0.0 and <= 1.0."),
        ("--lm-weight", "0.5", "lm_weight needs a causal LM; task 'text-classification'"),
    ]:
        assert _cli([*base, flag, value]) == 2, flag
        err = capsys.readouterr().err
        assert message in " ".join(err.split()) and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_budget_before_the_horizon_is_a_warning_in_the_log_and_the_record(
    tmp_path: Path,
    tiny_bert_dir: Path,
    onnx_dir: Path,
    fake_cpu_clock: Callable[[float], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    result = _compressed(tmp_path, onnx_dir, "svd")
    fake_cpu_clock(10.0)  # a step costs 10 CPU s
    with caplog.at_level(logging.WARNING, logger="factorlm.recovery.train"):
        out = recover(
            tiny_bert_dir, result.plan_path, tmp_path / "out", data=TEXTS, steps=8,
            batch_size=4, onnx_model=onnx_dir / "model.onnx", progress=False,
            time_budget_s=35.0, clock="cpu", feature_fraction=0.5,
        )  # fmt: skip
    # 3 steps fit 35 s; the horizon of 8 would switch to output distillation after step 4.
    assert (out.stopped, out.steps_done, out.steps) == ("time", 3, 8)
    assert out.warning is not None
    assert "stopped training after 3/8 steps" in out.warning
    assert "still at 86% of its peak" in out.warning  # step 3 of the decay: (8 - 2) / (8 - 1)
    assert "output-distillation phase (after step 4) never started" in out.warning
    assert "lower steps (--steps) to about 2 so the schedule fits" in out.warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and out.warning in warnings[0].getMessage()
    record = json.loads((tmp_path / "out" / "recovery.json").read_text())
    assert (record["stopped"], record["steps_done"], record["steps"]) == ("time", 3, 8)
    assert record["warning"] == out.warning


def test_cut_short_warning_names_the_phase_only_when_it_never_started() -> None:
    from factorlm.recovery.schedule import cut_short_warning

    cfg = TrainConfig(steps=10, time_budget_s=60.0, clock="wall", feature_fraction=0.5)
    assert "output-distillation phase (after step 5) never started" in cut_short_warning(cfg, 5)
    late = cut_short_warning(cfg, 6)
    assert "phase" not in late and "6/10 steps" in late and "60 wall s" in late
    assert "phase" not in cut_short_warning(dataclasses.replace(cfg, feature_fraction=0.0), 2)
    assert "phase" not in cut_short_warning(dataclasses.replace(cfg, feature_fraction=1.0), 2)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", 0.0, r"'temperature' is 0.0; it must be > 0.0"),
        ("feature_fraction", -0.1, r"'feature_fraction' is -0.1; it must be >= 0.0 and <= 1.0"),
        ("lm_weight", -1.0, r"'lm_weight' is -1.0; it must be >= 0.0"),
        ("clock", "gpu", "'clock' is 'gpu'; choose one of wall, cpu"),
        ("calib_samples", 8, "RecoverOptions has no option 'calib_samples'"),
    ],
)
def test_recover_refuses_bad_settings_before_any_work(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        recover(tmp_path / "no-model", tmp_path / "no-plan.json", tmp_path / "out",
                data=TEXTS, **{field: value})  # fmt: skip


def test_parse_duration() -> None:
    from factorlm.cli.recover import parse_duration

    assert parse_duration("15m") == 900 and parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400 and parse_duration("30") == 30
