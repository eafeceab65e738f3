"""Speed, peak memory and accuracy of truncated SVD over a BERT-base-shaped set of weights.

All 72 linear weights of BERT-base (12 layers × Q, K, V, O 768×768, FFN-in 768×3072, FFN-out
3072×768), random with a decaying spectrum ``s_i = (i + 1)^-0.5 + 0.05`` (power law with a noise
floor, the shape pretrained transformer weights show), truncated at 25% of ``min(in, out)``
(rank 192). Three paths are timed on the same weights:

- ``exact``: ``truncated_svd(method="exact")`` (LAPACK gesdd, thin SVD, float64);
- ``randomized``: ``truncated_svd(method="randomized")`` (what ``auto`` picks for these shapes);
- ``numpy-full``: ``numpy.linalg.svd(full_matrices=True)`` then truncation, the naive baseline.

Times cover the factorization only (float32 weight in, float32 factors out), not the error
check. Peak memory is the tracemalloc peak of Python/numpy allocations during each path (BLAS-internal
buffers are not counted). The error ratio is ‖W − Ŵ‖_F / ‖W − Ŵ_exact‖_F per weight.

Run: ``.venv/bin/python benchmarks/decompose_speed.py [--layers 12] [--out FILE.md]``
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy

from factorlm.decompose import truncated_svd

__all__ = ["bert_base_weights", "main"]

logger = logging.getLogger(__name__)

_SHAPES = [(768, 768)] * 4 + [(768, 3072), (3072, 768)]


def bert_base_weights(layers: int, seed: int = 0) -> list[np.ndarray]:
    """``6 * layers`` float32 weights with BERT-base shapes and a decaying spectrum."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        for m, n in _SHAPES:
            k = min(m, n)
            u, _ = np.linalg.qr(rng.standard_normal((m, k)))
            v, _ = np.linalg.qr(rng.standard_normal((n, k)))
            s = (np.arange(k) + 1.0) ** -0.5 + 0.05
            out.append(((u * s) @ v.T).astype(np.float32))
    return out


def _numpy_full(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=True)
    root = np.sqrt(s[:rank])
    return (u[:, :rank] * root).astype(w.dtype), (root[:, None] * vt[:rank]).astype(w.dtype)


def _ours(method: str) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    def run(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        lr = truncated_svd(w, rank, method=method)  # type: ignore[arg-type]
        return lr.left, lr.right

    return run


def _run(
    name: str,
    weights: list[np.ndarray],
    factorize: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
) -> tuple[float, float, float, list[float]]:
    """Wall time (s), CPU time (s), tracemalloc peak (MiB) and per-weight errors of one path."""
    errors = []
    elapsed = 0.0
    cpu = 0.0
    tracemalloc.start()
    for w in weights:
        rank = min(w.shape) // 4
        start, start_cpu = time.perf_counter(), time.process_time()
        left, right = factorize(w, rank)
        elapsed += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        approx = left.astype(np.float64) @ right.astype(np.float64)
        errors.append(float(np.linalg.norm(w.astype(np.float64) - approx)))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    logger.info("%s: %.2f s", name, elapsed)
    return elapsed, cpu, peak / 2**20, errors


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _blas() -> str:
    try:
        from threadpoolctl import threadpool_info

        infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        return ", ".join(
            f"{i['internal_api']} {i['version']} ({i['num_threads']} threads)" for i in infos
        )
    except ImportError:
        return "unknown"


def main() -> None:
    """Run the three paths and print (or write) a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="BLAS threads (default: the library's own)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=args.threads, user_api="blas"):
            _benchmark(args.layers, args.out)
    else:
        _benchmark(args.layers, args.out)


def _benchmark(layers: int, out: Path | None) -> None:
    """Generate the weights, time every path, print and optionally write the table."""

    load_before = os.getloadavg()
    start = time.perf_counter()
    weights = bert_base_weights(layers)
    generate = time.perf_counter() - start

    paths = [
        ("randomized", _ours("randomized")),
        ("exact", _ours("exact")),
        ("numpy-full", _numpy_full),
    ]
    results = {name: _run(name, weights, fn) for name, fn in paths}
    exact_errors = np.array(results["exact"][3])
    load_after = os.getloadavg()
    lines = [
        "# Decomposition speed: BERT-base-shaped weights at 25% rank",
        "",
        f"- weights: {len(weights)} ({layers} layers × 4 of 768×768, 768×3072, 3072×768), "
        "float32, spectrum (i+1)^-0.5 + 0.05, rank = min(in, out) / 4 = 192",
        f"- machine: {os.cpu_count()} cores, {_cpu_model()}; numpy {np.__version__}, "
        f"scipy {scipy.__version__}, BLAS {_blas()}",
        f"- command: .venv/bin/python benchmarks/decompose_speed.py {' '.join(sys.argv[1:])}",
        "- load average (1, 5, 15 min) before: "
        + ", ".join(f"{x:.2f}" for x in load_before)
        + "; after: "
        + ", ".join(f"{x:.2f}" for x in load_after)
        + " (the CPU is shared with other jobs; CPU time is the load-independent figure)",
        f"- generating the weights took {generate:.1f} s (not counted)",
        "",
        "| path | wall time (s) | CPU time (s) | per weight, wall (ms) "
        "| peak traced memory (MiB) | error / exact: mean | max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (elapsed, cpu, peak, errors) in results.items():
        ratio = np.array(errors) / exact_errors
        lines.append(
            f"| {name} | {elapsed:.2f} | {cpu:.2f} | {1000 * elapsed / len(weights):.1f} "
            f"| {peak:.1f} | {ratio.mean():.5f} | {ratio.max():.5f} |"
        )
    randomized_time = results["randomized"][0]
    worst = float(np.max(np.array(results["randomized"][3]) / exact_errors))
    lines += [
        "",
        f"Target (randomized ≤ 10 s, error within 1% of exact): time {randomized_time:.2f} s "
        f"{'met' if randomized_time <= 10 else 'NOT met'}, worst error ratio {worst:.5f} "
        f"{'met' if worst <= 1.01 else 'NOT met'}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)


if __name__ == "__main__":
    main()
