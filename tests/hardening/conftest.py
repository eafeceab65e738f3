"""A small world of inputs for the hardening tests: tiny ONNX models, a plan, data and a config.

Built once per session (in code, no download); every test copies it, so a command that writes
where it must not is caught by comparing the whole tree before and after.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import mlp


@pytest.fixture(scope="session")
def base_world(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """The shared inputs: ``model.onnx`` (+ ``plan.json``), ``ext/`` (external data), ``hf/``."""
    import onnx

    from factorlm.cli import main

    root = tmp_path_factory.mktemp("world")
    model = mlp(64, 128, 48, seed=3, decay=0.05)
    onnx.save(model, root / "model.onnx")
    (root / "ext").mkdir()
    onnx.save(
        model,
        root / "ext" / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    made = root / "made"
    code = main(
        ["compress", str(root / "model.onnx"), "-o", str(made / "m.onnx"), "--method", "svd",
         "--ratio", "0.5", "--min-size", "1"]
    )  # fmt: skip
    assert code == 0
    shutil.copy(made / "m.plan.json", root / "plan.json")
    shutil.rmtree(made)
    shutil.copytree(tiny_bert_dir, root / "hf")
    from factorlm.exporters.hf import export

    export(root / "hf", root / "bert", task="text-classification", progress=False)
    code = main(
        ["compress", str(root / "bert" / "model.onnx"), "-o", str(made / "b.onnx"), "--method",
         "svd", "--ratio", "0.9", "--min-size", "1"]
    )  # fmt: skip
    assert code == 0
    shutil.copy(made / "b.plan.json", root / "bert.plan.json")
    shutil.rmtree(made)
    (root / "data.jsonl").write_text(
        "".join(f'{{"text": "good movie number {i}", "label": "pos"}}\n' for i in range(20))
    )
    (root / "data.txt").write_text("a fine film.\n\nanother one.\n")
    return root


@pytest.fixture
def world(tmp_path: Path, base_world: Path) -> Path:
    """A private copy of the inputs in ``tmp_path/w``."""
    target = tmp_path / "w"
    shutil.copytree(base_world, target, symlinks=True)
    return target
