"""``factorlm compress`` and ``factorlm.compress.compress`` end to end.

Outputs pass the full checker and run in ORT; factors reproduce the plan's expected error; a
second run factorizes nothing; bad input gives one line, exit 2, an untouched input and no output.
A randomly initialised BERT exported with optimum shows which ORT fusions survive.
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, numpy_helper

from factorlm.cli import main
from factorlm.compression import compress
from factorlm.planning import Plan
from hf_models import export_bert
from models import embedding_lm, mlp, run_ort, write_model


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    return write_model(mlp(64, 192, 48, decay=0.05), tmp_path / "in" / "mlp.onnx")


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_cli_compress_writes_checked_model_and_plan(mlp_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "mlp_c.onnx"
    argv = ["compress", str(mlp_path), "-o", str(out), "--method", "svd", "--ratio", "0.5"]
    assert main([*argv, "--min-size", "0"]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    plan = json.loads((tmp_path / "out" / "mlp_c.plan.json").read_text())
    assert set(plan["weights"]) == {"fc1.weight", "fc2.weight"}
    totals = plan["totals"]
    assert totals["params_after"] <= 0.5 * totals["params_before"]
    original, factored = _weights(mlp_path), _weights(out)
    for name, entry in plan["weights"].items():
        left, right = factored[f"{name}.factorlm_left"], factored[f"{name}.factorlm_right"]
        assert left.shape == (entry["shape"][0], entry["rank"])
        w = original[name].astype(np.float64)
        err = np.linalg.norm(w - left.astype(np.float64) @ right) / np.linalg.norm(w)
        assert err == pytest.approx(entry["expected_error"], rel=1e-4, abs=1e-6)
    x = np.random.default_rng(1).standard_normal((3, 7, 64)).astype(np.float32)
    assert run_ort(str(out), {"x": x})[0].shape == (3, 7, 48)

    # A second run finds only factors: nothing new is factorized.
    again = compress(
        out, tmp_path / "out2" / "again.onnx", min_size=0, method="svd", joint_qkv=False
    )
    assert again.factorized == 0
    assert all("already a factor" in r for r in again.plan.skipped.values())


def test_edited_plan_is_applied_and_validated(mlp_path: Path, tmp_path: Path) -> None:
    first = compress(mlp_path, tmp_path / "a.onnx", min_size=0, method="svd", joint_qkv=False)
    assert first.plan_path is not None
    data = json.loads(first.plan_path.read_text())
    data["weights"]["fc1.weight"]["rank"] = 5
    del data["weights"]["fc2.weight"]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    second = compress(mlp_path, tmp_path / "b.onnx", plan=edited)
    assert second.factorized == 1
    assert _weights(tmp_path / "b.onnx")["fc1.weight.factorlm_left"].shape == (64, 5)
    assert "fc2.weight" in _weights(tmp_path / "b.onnx")
    assert (
        Plan.from_json(second.plan_path.read_text()).weights["fc1.weight"].params_after == 5 * 256
    )  # type: ignore[union-attr]


@pytest.mark.parametrize(("allocation", "floor"), [("uniform", 0.0), ("lagrangian", 1.0)])
def test_allocation_and_min_fraction_reach_the_planner(
    mlp_path: Path, tmp_path: Path, allocation: str, floor: float
) -> None:
    out = tmp_path / "o.onnx"
    argv = ["compress", str(mlp_path), "-o", str(out), "--method", "svd", "--ratio", "0.6"]
    argv += ["--min-size", "0"]
    assert main([*argv, "--allocation", allocation, "--min-fraction", str(floor)]) == 0
    plan = json.loads((tmp_path / "o.plan.json").read_text())
    assert (plan["budget"]["allocation"], plan["budget"]["min_fraction"]) == (allocation, floor)
    expected = compress(
        mlp_path,
        tmp_path / "api.onnx",
        ratio=0.6,
        min_size=0,
        allocation=allocation,
        min_fraction=floor,
        method="svd",
        joint_qkv=False,
    )
    assert {k: v["rank"] for k, v in plan["weights"].items()} == {
        k: v.rank for k, v in expected.plan.weights.items()
    }


@pytest.mark.parametrize(
    ("method", "extra"),
    [("kron", []), ("losparse", ["--sparse-density", "0.1"]), ("svd", ["--energy", "0.9"])],
)
def test_other_methods_run_in_ort(
    mlp_path: Path, tmp_path: Path, method: str, extra: list[str]
) -> None:
    out = tmp_path / f"{method}.onnx"
    argv = [
        "compress",
        str(mlp_path),
        "-o",
        str(out),
        "--method",
        method,
        "--min-size",
        "0",
        *extra,
    ]
    assert main(argv) == 0
    x = np.random.default_rng(2).standard_normal((2, 5, 64)).astype(np.float32)
    got = run_ort(str(out), {"x": x})[0]
    ref = run_ort(str(mlp_path), {"x": x})[0]
    assert got.shape == ref.shape
    assert np.linalg.norm(got - ref) < np.linalg.norm(ref)  # an approximation, not noise


def test_embeddings_and_external_data(tmp_path: Path) -> None:
    src = tmp_path / "lm.onnx"
    onnx.save_model(embedding_lm(512, 64), str(src))
    out = tmp_path / "o" / "lm_c.onnx"
    argv = [
        "compress",
        str(src),
        "-o",
        str(out),
        "--method",
        "svd",
        "--embeddings",
        "0.3",
        "--min-size",
        "0",
        "--external-data",
    ]
    assert main(argv) == 0
    assert (tmp_path / "o" / "lm_c.onnx.data").is_file()
    plan = json.loads((tmp_path / "o" / "lm_c.plan.json").read_text())
    assert plan["weights"]["embed.weight"]["nodes"] == ["embed/Gather", "head/MatMul"]
    ids = np.array([[1, 2, 511]])
    assert run_ort(str(out), {"ids": ids})[0].shape == (1, 3, 512)


def _bad_inputs(tmp_path: Path, good: Path) -> dict[str, tuple[Path, list[str], str]]:
    folder = tmp_path / "bad"
    folder.mkdir()
    text = folder / "text.onnx"
    text.write_text("not a model\n")
    cut = folder / "cut.onnx"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    ext_dir = folder / "ext"
    ext_dir.mkdir()
    model = mlp(64, 192, 48)
    external_data_helper.convert_model_to_external_data(model, location="w.bin", size_threshold=0)
    onnx.save_model(model, str(ext_dir / "m.onnx"))
    (ext_dir / "w.bin").unlink()
    evil_dir = folder / "evil"
    evil_dir.mkdir()
    model = mlp(64, 192, 48)
    external_data_helper.convert_model_to_external_data(model, location="w.bin", size_threshold=0)
    onnx.save_model(model, str(evil_dir / "m.onnx"))
    proto = onnx.load(str(evil_dir / "m.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../w.bin"
    (evil_dir / "m.onnx").write_bytes(proto.SerializeToString())
    plan = folder / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "format": "factorlm.plan/1",
                "weights": {
                    "nope.weight": {
                        "nodes": [],
                        "kind": "linear",
                        "shape": [1, 1],
                        "stored_shape": [1, 1],
                        "method": "svd",
                        "rank": 1,
                    }
                },
            }
        )
    )
    return {
        "not onnx": (text, [], "is not an ONNX file"),
        "truncated": (cut, [], "truncated or corrupt"),
        "missing external": (ext_dir / "m.onnx", [], "is missing"),
        "outside folder": (evil_dir / "m.onnx", [], "outside the model's folder"),
        "unknown method": (good, ["--method", "magic"], "'magic' is not one of 'svd', 'whiten'"),
        "ratio": (good, ["--ratio", "1.5"], "--ratio is 1.5; it must be > 0.0 and < 1.0."),
        "allocation": (good, ["--allocation", "best"], "'best' is not one of 'optimal'"),
        "min fraction": (good, ["--min-fraction", "1.5"], "--min-fraction is 1.5; it must be"),
        "include": (good, ["--include", "^nothing$"], "matches no weight"),
        "plan": (good, ["--plan", str(plan)], "'nope.weight', which is not in the model"),
        "data-aware": (good, ["--method", "whiten"], "needs calibration statistics"),
        "infeasible": (good, ["--ratio", "0.01", "--rank-multiple", "64"], "infeasible"),
    }


def test_bad_input_one_line_exit_2_nothing_written(
    mlp_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for case, (src, extra, message) in _bad_inputs(tmp_path, mlp_path).items():
        before = _digest(src)
        out_dir = tmp_path / f"out-{case.replace(' ', '_')}"
        out_dir.mkdir()
        argv = ["compress", str(src), "-o", str(out_dir / "o.onnx"), "--method", "svd"]
        code = main([*argv, "--min-size", "0", *extra])
        err = capsys.readouterr().err
        assert code == 2, case
        assert message in err, (case, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, case
        assert _digest(src) == before, case
        assert list(out_dir.iterdir()) == [], case


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT exported by optimum (seconds, no download)."""
    pytest.importorskip("torch")
    return export_bert(
        tmp_path_factory.mktemp("bert"),
        vocab_size=256,
        hidden_size=64,
        intermediate_size=256,
        opset=17,
    )


def _fusions(path: Path) -> dict[str, int]:
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=64, opt_level=0)
    counts = collections.Counter(n.op_type for n in opt.model.graph.node)
    return {
        k: counts[k]
        for k in ("Attention", "SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization")
    }


def test_real_bert_export_exact_at_full_rank_and_fusions(tiny_bert: Path, tmp_path: Path) -> None:
    feeds = {
        "input_ids": np.random.default_rng(0).integers(0, 256, (2, 9)),
        "attention_mask": np.ones((2, 9), np.int64),
        "token_type_ids": np.zeros((2, 9), np.int64),
    }
    ref = run_ort(str(tiny_bert), feeds)[0]
    src = onnx.load(str(tiny_bert))

    lossless = tmp_path / "lossless.onnx"
    plan = compress(tiny_bert, tmp_path / "p.onnx", min_size=0, method="svd", joint_qkv=False).plan
    for entry in plan.weights.values():
        entry.rank = min(entry.shape)
    assert compress(tiny_bert, lossless, plan=plan).factorized == len(plan.weights) > 0
    got = onnx.load(str(lossless))
    assert [i.name for i in got.graph.input] == [i.name for i in src.graph.input]
    assert got.graph.input == src.graph.input and got.graph.output == src.graph.output
    opsets = [{(o.domain or "ai.onnx", o.version) for o in m.opset_import} for m in (got, src)]
    assert opsets[0] == opsets[1]
    assert got.metadata_props[0].key == "factorlm.factors"
    out = run_ort(str(lossless), feeds)[0]
    assert np.linalg.norm(out - ref) <= 1e-4 * np.linalg.norm(ref)

    # Fusions: factorized attention projections lose Attention (and with it EmbedLayerNorm);
    # bias Add / LayerNorm / Gelu neighbours survive. Excluding the attention linears keeps all.
    compressed = tmp_path / "c.onnx"
    compress(tiny_bert, compressed, ratio=0.5, min_size=0, method="svd", joint_qkv=False)
    keep_attention = tmp_path / "k.onnx"
    compress(
        tiny_bert,
        keep_attention,
        ratio=0.5,
        min_size=0,
        exclude=r"/attention/",
        method="svd",
        joint_qkv=False,
    )
    before, after, kept = _fusions(tiny_bert), _fusions(compressed), _fusions(keep_attention)
    print(f"fusions original {before}, compressed {after}, attention excluded {kept}")
    assert (
        before["Attention"] == 2
        and before["SkipLayerNormalization"] == 4
        and before["BiasGelu"] == 2
    )
    assert after["SkipLayerNormalization"] == 4 and after["BiasGelu"] == 2
    assert kept == before
