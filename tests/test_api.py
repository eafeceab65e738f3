"""The Python API: factorlm.export/compress/build/benchmark/recover/run as typed functions."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import factorlm
from factorlm.errors import ConfigError, FactorlmError
from factorlm.options import BenchOptions, BuildOptions, CompressOptions, RecoverOptions


def _mlp(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 96])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def test_verbs_are_callable_and_mirror_the_cli(tmp_path: Path) -> None:
    source = _mlp(tmp_path / "mlp.onnx")
    result = factorlm.compress(
        source, tmp_path / "out" / "model.onnx", CompressOptions(method="svd", min_size=1)
    )
    assert result.factorized == 1
    assert result.plan.weights["w"].method == "svd"
    manifest = factorlm.build(tmp_path / "out" / "model.onnx", tmp_path / "engine", optimize=False)
    assert (tmp_path / "engine" / manifest.engine).is_file()
    report = factorlm.benchmark(
        source, [tmp_path / "engine"], BenchOptions(shapes=("2x8",), warmup=1, iterations=3)
    )
    assert [row["shape"] for row in report.data["latency"]] == ["2x8"]
    assert report.data["settings"]["iterations"] == 3


def test_keyword_overrides_are_validated_like_the_options(tmp_path: Path) -> None:
    source = _mlp(tmp_path / "mlp.onnx")
    result = factorlm.compress(
        source, tmp_path / "a.onnx", method="svd", ratio=0.25, rank_multiple=1, min_size=1
    )
    # 64x96 at a quarter of the parameters: rank r costs r * (64 + 96) <= 0.25 * 64 * 96
    assert result.plan.weights["w"].rank == 9
    with pytest.raises(ConfigError, match=re.escape("'ratio' is 1.0; it must be > 0.0 and < 1.0")):
        factorlm.compress(source, tmp_path / "b.onnx", method="svd", ratio=1.0)
    with pytest.raises(ConfigError, match="did you mean 'ratio'"):
        factorlm.compress(source, tmp_path / "b.onnx", ratoi=0.5)
    assert not (tmp_path / "b.onnx").exists()


def test_default_method_is_data_aware_and_asks_for_statistics(tmp_path: Path) -> None:
    source = _mlp(tmp_path / "mlp.onnx")
    assert CompressOptions().method == "whiten" and CompressOptions().ratio == 0.6
    with pytest.raises(FactorlmError, match="calibration"):
        factorlm.compress(source, tmp_path / "c.onnx", min_size=1)
    assert not (tmp_path / "c.onnx").exists()


def test_unknown_backend_and_bad_config_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'backend' is 'tvm'; choose one of ort, tensorrt"):
        factorlm.build(tmp_path / "m.onnx", tmp_path / "e", backend="tvm")
    with pytest.raises(ConfigError, match="applies to the tensorrt backend only"):
        factorlm.build(tmp_path / "m.onnx", tmp_path / "e", bf16=True)
    with pytest.raises(ConfigError, match="did you mean 'compress'"):
        factorlm.run({"compres": {}})


VERBS = ("export", "compress", "build", "benchmark", "recover", "run", "sweep")


@pytest.mark.parametrize("verb", VERBS)
def test_verbs_are_plain_functions_with_real_signatures(verb: str) -> None:
    function = getattr(factorlm, verb)
    assert inspect.isfunction(function)
    parameters = inspect.signature(function).parameters
    assert "args" not in parameters
    assert len(parameters) >= 2 and function.__doc__


def test_signatures_take_an_options_object() -> None:
    expected = {
        "compress": CompressOptions,
        "build": BuildOptions,
        "benchmark": BenchOptions,
        "recover": RecoverOptions,
    }
    for verb, options in expected.items():
        parameter = inspect.signature(getattr(factorlm, verb)).parameters["options"]
        assert parameter.default is None
        assert options.__name__ in str(parameter.annotation)
    assert list(inspect.signature(factorlm.compress).parameters)[:3] == [
        "model",
        "output",
        "options",
    ]
    assert "force" in inspect.signature(factorlm.run).parameters


def test_benchmark_stays_a_function_after_its_package_is_imported() -> None:
    import factorlm.bench.report
    import factorlm.bench.runners as runners
    from factorlm.bench import run_benchmark

    assert inspect.isfunction(factorlm.benchmark)
    assert type(factorlm) is types.ModuleType  # a plain module: no class swap behind the verb
    assert callable(run_benchmark) and callable(runners.load_runner)
    assert factorlm.bench.report.Report.__module__ == "factorlm.bench.report"
    assert "factorlm.benchmark" not in sys.modules
    parameters = inspect.signature(factorlm.benchmark).parameters
    assert list(parameters)[:3] == ["reference", "candidates", "options"]
    assert parameters["data"].kind is inspect.Parameter.KEYWORD_ONLY
    assert parameters["overrides"].kind is inspect.Parameter.VAR_KEYWORD


def test_import_factorlm_is_cheap() -> None:
    code = (
        "import sys, factorlm; "
        "heavy = [m for m in ('torch', 'onnxruntime', 'transformers', 'onnx', 'numpy') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


_MYPY = Path(sys.executable).parent / "mypy"


@pytest.mark.skipif(not _MYPY.exists(), reason="mypy is not installed in this environment")
def test_user_script_type_checks_with_mypy_strict(tmp_path: Path) -> None:
    script = Path(__file__).with_name("api_user_script.py")
    bad = tmp_path / "bad_user.py"
    bad.write_text(
        "import factorlm\n"
        "from factorlm.options import BuildOptions\n"
        "result = factorlm.compress('m.onnx', 'o.onnx', BuildOptions())\n"
        "count: str = result.factorized\n"
    )
    good = subprocess.run(
        [str(_MYPY), "--strict", "--no-incremental", str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert good.returncode == 0, good.stdout + good.stderr
    wrong = subprocess.run(
        [str(_MYPY), "--strict", "--no-incremental", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert wrong.returncode == 1
    assert 'incompatible type "BuildOptions"' in wrong.stdout
    assert 'expression has type "int", variable has type "str"' in wrong.stdout
