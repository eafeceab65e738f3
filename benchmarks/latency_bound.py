"""Does the FLOP saving of a factorization turn into ONNX Runtime CPU latency?

A randomly initialised BERT (hidden 768, FFN 3072: BERT-base layers; ``--layers`` of them) is
exported with optimum and compressed with plain SVD at linear-parameter ratios 0.5 and 0.3. The
original and each compressed model run in ORT (CPU, all graph optimizations) at batch 1 and 8,
sequence 128, measured *alternately* in one run (round-robin over the models, after warm-up), so
load from other processes hits all of them alike. Reported: median latency, realized speedup,
the FLOP-bound speedup (FLOPs per token of the whole model: every linear weight plus attention's
``QKᵀ`` and ``AV``), and realized / bound (target ≥ 0.85).
Usage: ``.venv/bin/python benchmarks/latency_bound.py [--layers 4] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, publish
from compress_speed import export_bert
from factorlm.compression import compress
from factorlm.io import load_model

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
SEQ = 128


def _linear_params(path: Path) -> int:
    """Parameters of every MatMul/Gemm constant weight (factors included)."""
    return _linear_flops(path) // 2


def _linear_flops(path: Path) -> int:
    """FLOPs per token of every MatMul/Gemm with a constant weight (factors included)."""
    model = load_model(path)
    total = 0
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        for value in node.inputs[:2]:
            if (
                value is not None
                and value.const_value is not None
                and len(value.const_value.shape) == 2
            ):
                m, n = (int(d) for d in value.const_value.shape.numpy())
                total += 2 * m * n
    return total


def _session(path: Path, threads: int) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "factorlm-bench")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latency_bound.md")
    args = parser.parse_args(argv)
    folder = args.work / f"bert-base-{args.layers}l"
    folder.mkdir(parents=True, exist_ok=True)
    original = export_bert(folder, layers=args.layers)
    hidden, layers = 768, args.layers
    attention_flops = layers * 2 * 2 * SEQ * hidden  # QKᵀ and AV per token
    models = {"original": original}
    linear_ratio: dict[str, float] = {}
    for ratio in (0.5, 0.3):
        out = args.work / f"bert-{layers}l-svd{ratio}" / "model.onnx"
        compress(original, out, ratio=ratio, min_size=0, method="svd", joint_qkv=False)
        models[f"ratio {ratio}"] = out
        linear_ratio[f"ratio {ratio}"] = _linear_params(out) / _linear_params(original)
    flops = {name: _linear_flops(path) + attention_flops for name, path in models.items()}
    sessions = {name: _session(path, args.threads) for name, path in models.items()}
    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 8):
        feeds = {
            "input_ids": rng.integers(0, 30522, (batch, SEQ)),
            "attention_mask": np.ones((batch, SEQ), np.int64),
            "token_type_ids": np.zeros((batch, SEQ), np.int64),
        }
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for sess in sessions.values():  # warm-up
            sess.run(None, feeds)  # type: ignore[attr-defined]
        order = list(sessions)
        for i in range(args.repeats):
            for name in order if i % 2 == 0 else reversed(order):
                start = time.perf_counter()
                sessions[name].run(None, feeds)  # type: ignore[attr-defined]
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["original"])
        for name in sessions:
            med = statistics.median(times[name])
            if name == "original":
                rows.append(f"| {batch} | original | - | {med * 1e3:.1f} | 1.00 | 1.00 | - |")
                continue
            # Pairwise ratio per alternation round, then the median: robust to load drift.
            pairwise = statistics.median(
                o / c for o, c in zip(times["original"], times[name], strict=True)
            )
            bound = flops["original"] / flops[name]
            rows.append(
                f"| {batch} | {name} | {linear_ratio[name]:.3f} | {med * 1e3:.1f} | {base / med:.2f} "
                f"(pairwise {pairwise:.2f}) | {bound:.2f} | {pairwise / bound:.2f} |"
            )
    lines = [
        "# ORT CPU latency: original vs SVD-compressed, realized vs FLOP-bound speedup",
        "",
        f"Command: `.venv/bin/python benchmarks/latency_bound.py --layers {args.layers} --repeats {args.repeats} --threads {args.threads}`",
        f"Machine: {machine()}",
        f"Model: random BERT, {layers} layers of BERT-base shape (hidden 768, FFN 3072), sequence {SEQ}, "
        f"ORT_ENABLE_ALL, {args.threads} intra-op threads, {args.repeats} alternating rounds after warm-up.",
        "",
        "| batch | model | linear params kept | median ms | speedup | FLOP bound | realized / bound (target >= 0.85) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"FLOPs per token (linear + attention): {', '.join(f'{k} {v / 1e6:.1f}M' for k, v in flops.items())}",
        "",
    ]
    publish(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
