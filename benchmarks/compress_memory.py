"""Peak memory of ``factorlm compress``: streamed from external data vs weights held in memory.

Writes a Llama-shaped stack of random linear weights (``--layers`` blocks of Q/K/V/O
``hidden x hidden`` and gate/up/down ``hidden x ffn``; gate and up read the same activation, so
they form one joint candidate like Q/K/V) straight into an external data file through
``numpy.memmap``, one weight at a time, so the builder never holds the model. The same model is
also saved with its weights embedded in the protobuf. Then, each in a fresh subprocess whose
``ru_maxrss`` is its own:

1. ``streamed``: compress the external-data model (weights read one at a time from the file,
   factors spilled to disk, output written with external data);
2. ``in memory``: compress the embedded model (the whole protobuf is parsed into memory first,
   as before this change for every model).

Each child reports its resident memory after importing factorlm (the fixed overhead) and its
peak (``VmHWM``: a spawned child's ``ru_maxrss`` includes the parent's resident memory at the
fork, which here holds the embedded model just written); the table gives the peak, the peak above the overhead, and both as multiples of the model
and of its largest single weight, for each model depth in ``--layers`` (the streamed peak should
not grow with the depth). Outputs of both runs are compared weight by weight.

    .venv/bin/python benchmarks/compress_memory.py [--layers 5 10] [--hidden 1024] [--ffn 4096]
        [--method svd] [--ratio 0.6] [--work DIR] [--out benchmarks/results/compress_memory.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import machine, publish

__all__ = ["main", "write_model"]

HERE = Path(__file__).resolve().parent


def _weights(layers: int, hidden: int, ffn: int) -> list[tuple[str, tuple[int, int]]]:
    shapes = []
    for i in range(layers):
        for name in ("q", "k", "v", "o"):
            shapes.append((f"layers.{i}.{name}.weight", (hidden, hidden)))
        shapes.append((f"layers.{i}.gate.weight", (hidden, ffn)))
        shapes.append((f"layers.{i}.up.weight", (hidden, ffn)))
        shapes.append((f"layers.{i}.down.weight", (ffn, hidden)))
    return shapes


def write_model(folder: Path, *, layers: int, hidden: int, ffn: int, seed: int = 0) -> Path:
    """``folder/model.onnx`` + ``weights.bin`` (every weight external, threshold 0)."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    shapes = _weights(layers, hidden, ffn)
    total = sum(4 * r * c for _, (r, c) in shapes)
    data = folder / "weights.bin"
    mapped = np.memmap(data, dtype=np.uint8, mode="w+", shape=(total,))
    rng = np.random.default_rng(seed)
    inits, offset = [], 0
    for name, (rows, cols) in shapes:
        view = mapped[offset : offset + 4 * rows * cols].view(np.float32).reshape(rows, cols)
        for start in range(0, rows, 256):  # a block of rows at a time: the builder stays small
            block = rng.standard_normal((min(256, rows - start), cols), dtype=np.float32)
            view[start : start + block.shape[0]] = block * np.float32(0.02)
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[rows, cols])
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", data.name),
            ("offset", offset),
            ("length", 4 * rows * cols),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        inits.append(tensor)
        offset += 4 * rows * cols
        mapped.flush()
    del mapped
    nodes, x = [], "x"
    for i in range(layers):
        p = f"layers.{i}"

        def mm(a: str, w: str, out: str, _p: str = p) -> None:
            nodes.append(helper.make_node("MatMul", [a, f"{_p}.{w}.weight"], [out], name=out))

        for n in ("q", "k", "v"):
            mm(x, n, f"{p}/{n}")
        nodes.append(helper.make_node("Add", [f"{p}/q", f"{p}/k"], [f"{p}/qk"], name=f"{p}/qk"))
        nodes.append(helper.make_node("Add", [f"{p}/qk", f"{p}/v"], [f"{p}/a"], name=f"{p}/a"))
        mm(f"{p}/a", "o", f"{p}/o")
        nodes.append(helper.make_node("Add", [x, f"{p}/o"], [f"{p}/h"], name=f"{p}/h"))
        mm(f"{p}/h", "gate", f"{p}/gate")
        mm(f"{p}/h", "up", f"{p}/up")
        nodes.append(helper.make_node("Relu", [f"{p}/gate"], [f"{p}/act"], name=f"{p}/act"))
        nodes.append(
            helper.make_node("Mul", [f"{p}/act", f"{p}/up"], [f"{p}/mul"], name=f"{p}/mul")
        )
        mm(f"{p}/mul", "down", f"{p}/down")
        out = f"{p}/out" if i + 1 < layers else "y"
        nodes.append(helper.make_node("Add", [f"{p}/h", f"{p}/down"], [out], name=f"{p}/res"))
        x = out
    graph = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    return path


_CHILD = """
import json, resource, sys, time
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
import numpy, scipy.linalg, onnx, onnx_ir
from factorlm.compression import compress
from factorlm.options import CompressOptions
base = status_mb("VmRSS")
opts = CompressOptions(**json.loads(sys.argv[3]))
start = time.perf_counter()
result = compress(sys.argv[1], sys.argv[2], opts)
wall = time.perf_counter() - start
# VmHWM, not ru_maxrss: after fork + exec, ru_maxrss still counts the parent's resident memory
# at the fork (Linux keeps the old mm's high-water mark), VmHWM is this program's own.
peak = status_mb("VmHWM")
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"base_mb": base, "peak_mb": peak, "maxrss_mb": maxrss, "wall_s": wall, "seconds": result.seconds,
                  "factorized": result.factorized, "files": [str(p) for p in result.output_paths]}))
"""


def _child(source: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(source), str(out), json.dumps(options)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"compress failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _same_weights(a: Path, b: Path) -> bool:
    import onnx
    from onnx import numpy_helper

    wa = {t.name: t for t in onnx.load(str(a), load_external_data=False).graph.initializer}
    names = sorted(wa)
    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    ta = {t.name: numpy_helper.to_array(t) for t in ma.graph.initializer}
    tb = {t.name: numpy_helper.to_array(t) for t in mb.graph.initializer}
    return names == sorted(tb) and all(np.array_equal(ta[n], tb[n]) for n in names)


def _measure(work: Path, layers: int, args: argparse.Namespace) -> list[str]:
    """Build one model size, compress it both ways, return its table rows."""
    start = time.perf_counter()
    folder = work / f"layers{layers}"
    external = write_model(folder / "external", layers=layers, hidden=args.hidden, ffn=args.ffn)
    import onnx

    inline = folder / "inline" / "model.onnx"
    inline.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onnx.load(str(external)), str(inline))  # builder process; not measured
    print(f"{layers} layers built in {time.perf_counter() - start:.1f} s", flush=True)
    shapes = _weights(layers, args.hidden, args.ffn)
    model_mb = sum(4 * r * c for _, (r, c) in shapes) / 2**20
    largest_mb = max(4 * r * c for _, (r, c) in shapes) / 2**20
    options = {"method": args.method, "ratio": args.ratio, "min_size": 0}
    runs = {
        "streamed (external data)": _child(
            external, folder / "out_streamed" / "model.onnx", options
        ),
        "in memory (embedded)": _child(inline, folder / "out_inline" / "model.onnx", options),
    }
    same = _same_weights(
        Path(runs["streamed (external data)"]["files"][0]),
        Path(runs["in memory (embedded)"]["files"][0]),
    )
    rows = []
    for label, r in runs.items():
        extra = r["peak_mb"] - r["base_mb"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items())
        rows.append(
            f"| {layers} ({model_mb:.0f} MiB) | {label} | {r['peak_mb']:.0f} MiB | "
            f"{r['base_mb']:.0f} MiB | {extra:.0f} MiB | {r['peak_mb'] / model_mb:.2f}x | "
            f"{extra / largest_mb:.1f}x | {r['wall_s']:.1f} s | {stages} | "
            f"{'yes' if same else 'NO'} |"
        )
    return rows


def _cpu() -> str:
    """CPU model, core count, platform and the libraries that do the work."""
    import onnx_ir
    import scipy

    from factorlm.bench.latency import environment_info

    env = environment_info()
    return (
        f"{env['cpu']}, {env['cpu_count']} cores, {env['platform']}; numpy "
        f"{np.__version__}, scipy {scipy.__version__}, onnx-ir {onnx_ir.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--method", default="svd")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compress_memory.md")
    args = parser.parse_args(argv)
    command = "python benchmarks/compress_memory.py " + " ".join(argv or sys.argv[1:])
    work = args.work or Path(tempfile.mkdtemp(prefix="factorlm-memory-"))
    load_before = machine()
    rows = [row for layers in args.layers for row in _measure(work, layers, args)]
    largest_mb = 4 * args.hidden * args.ffn / 2**20
    joint_mb = 4 * args.hidden * 2 * args.ffn / 2**20  # gate+up, the largest joint matrix
    lines = [
        "# compress peak memory: streamed vs in memory",
        "",
        f"Command: `{command.strip()}`  ",
        f"CPU: {_cpu()}  ",
        f"Machine (before): {load_before}  ",
        f"Machine (after): {machine()}  ",
        f"Model: Llama-shaped blocks (hidden {args.hidden}, ffn {args.ffn}), 7 fp32 weights per "
        f"block; largest weight {largest_mb:.1f} MiB, largest joint candidate (gate+up) "
        f"{joint_mb:.1f} MiB; method {args.method}, ratio {args.ratio}, min_size 0. Each run in "
        "a fresh subprocess; peak = its VmHWM (ru_maxrss of a spawned child also counts the "
        "parent's memory at the fork), imports = VmRSS after importing factorlm.",
        "",
        "| layers (model) | run | peak RSS | after imports | peak - imports | peak / model | "
        "(peak - imports) / largest weight | wall | stages (s) | same output |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    publish(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
