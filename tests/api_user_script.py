"""A user's script calling the six API verbs; ``tests/test_api.py`` type-checks it with mypy --strict.

It is never run: it only has to type-check, the way a user's code would.
"""

from __future__ import annotations

from pathlib import Path

import factorlm
from factorlm.options import BenchOptions, BuildOptions, CompressOptions, RecoverOptions


def main(model_dir: Path, work: Path) -> bool:
    exported = factorlm.export(model_dir, work / "export")
    onnx_path: Path = exported.model
    compressed = factorlm.compress(
        onnx_path,
        work / "compressed" / "model.onnx",
        CompressOptions(method="svd", ratio=0.5),
        rank_multiple=16,
    )
    factorized: int = compressed.factorized
    manifest = factorlm.build(work / "compressed" / "model.onnx", work / "engine", BuildOptions())
    engine: str = manifest.engine
    report = factorlm.benchmark(
        work / "export", [("compressed", work / "engine")], BenchOptions(shapes=("1x128",))
    )
    recovered = factorlm.recover(
        model_dir,
        compressed.plan,
        work / "recovered",
        RecoverOptions(steps=10),
        data=["a text", "another text"],
    )
    steps: int = recovered.steps_done
    result = factorlm.run({"model": str(model_dir)}, force=True, output_dir=str(work / "run"))
    return report.passed and result.passed and factorized > 0 and bool(engine) and steps >= 0
