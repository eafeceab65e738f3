"""Runners: one small protocol over every backend, so a comparison never cares which one it holds.

Modelled on Polygraphy's runners: a runner is a context manager (``activate`` builds the session
or engine, ``deactivate`` frees it), ``infer(feeds) -> outputs`` maps input names to numpy arrays
and back, ``inputs``/``outputs`` describe the tensors (symbolic dimensions kept as strings), and
``last_inference_time`` is the wall time of the last ``infer`` call in seconds. ``describe()``
returns the settings a report must record (providers, threads, optimization level, engine file).

``load_runner`` accepts a model file (``.onnx``, ``.ort``, ``.plan``/``.engine``), a folder with a
``model.onnx`` (what ``factorlm export`` writes), or an engine folder with ``manifest.json`` (what
``factorlm build`` writes: ``model.onnx``/``model.ort``/``model.plan`` next to it). TensorRT is
imported only when a ``.plan`` is actually run, so the package works without it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from factorlm._common.sessions import create_session, graph_level, resolve_providers
from factorlm._common.userfiles import read_json
from factorlm.errors import BackendUnavailableError, ConfigError, ModelLoadError

__all__ = [
    "BaseRunner",
    "OrtRunner",
    "ResolvedModel",
    "Runner",
    "TensorMeta",
    "TrtRunner",
    "load_runner",
    "resolve_model",
]

logger = logging.getLogger(__name__)

Dim = int | str | None

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(bfloat16)": np.float32,  # fed and compared as float32
}


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype and shape of one model input or output; symbolic dims are strings or None."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@runtime_checkable
class Runner(Protocol):
    """What the benchmark needs from a backend."""

    name: str
    path: Path
    backend: str
    last_inference_time: float | None

    @property
    def inputs(self) -> tuple[TensorMeta, ...]: ...

    @property
    def outputs(self) -> tuple[TensorMeta, ...]: ...

    def __enter__(self) -> Runner: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...


class BaseRunner:
    """Context management and timing shared by every runner; subclasses implement ``_infer``."""

    backend = "base"

    def __init__(self, path: Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or _default_name(self.path)
        self.last_inference_time: float | None = None
        self._active = False
        self._inputs: tuple[TensorMeta, ...] = ()
        self._outputs: tuple[TensorMeta, ...] = ()
        self.folder: Path | None = None  # the export or engine folder the file came from
        self.manifest: dict[str, Any] | None = None  # that folder's manifest.json, if any

    @property
    def inputs(self) -> tuple[TensorMeta, ...]:
        self._require_active()
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorMeta, ...]:
        self._require_active()
        return self._outputs

    def __enter__(self) -> BaseRunner:
        if not self._active:
            self.activate()
            self._active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._active:
            self.deactivate()
            self._active = False

    def activate(self) -> None:
        """Load the model; called once by ``__enter__``."""

    def deactivate(self) -> None:
        """Release the session or engine; called by ``__exit__``."""

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference and record its wall time in ``last_inference_time``."""
        self._require_active()
        start = time.perf_counter()
        outputs = self._infer(feeds)
        self.last_inference_time = time.perf_counter() - start
        return outputs

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "backend": self.backend}

    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError(f"runner {self.name} is not active; use it as a context manager")


class OrtRunner(BaseRunner):
    """ONNX Runtime session over an ``.onnx`` or ``.ort`` file.

    Attributes:
        providers: execution providers in priority order (default: CPU).
        intra_op_threads / inter_op_threads: ORT thread pools; 0 lets ORT decide.
        graph_optimization_level: ``disable|basic|extended|layout|all``.
        allow_spinning: let idle ORT worker threads busy-wait. Off by default: in an alternating
            benchmark a spinning pool of one session steals the cores the next session needs.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: Path,
        *,
        name: str | None = None,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        graph_optimization_level: str = "all",
        allow_spinning: bool = False,
    ) -> None:
        super().__init__(path, name)
        self.allow_spinning = allow_spinning
        graph_level(graph_optimization_level)  # refuse an unknown level before any work
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.graph_optimization_level = graph_optimization_level
        self._session: Any = None

    def activate(self) -> None:
        providers = resolve_providers(self.providers)  # BackendUnavailableError if missing
        if not self.path.is_file():
            raise ModelLoadError(f"Model file {self.path} does not exist.")
        self._session = create_session(
            self.path,
            providers=providers,
            intra_op_num_threads=self.intra_op_threads,
            inter_op_num_threads=self.inter_op_threads,
            graph_optimization_level=self.graph_optimization_level,
            allow_spinning=self.allow_spinning,
            log_severity_level=3,
        )
        self._inputs = tuple(_ort_meta(m) for m in self._session.get_inputs())
        self._outputs = tuple(_ort_meta(m) for m in self._session.get_outputs())

    def deactivate(self) -> None:
        self._session = None

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [m.name for m in self._outputs]
        values = self._session.run(names, dict(feeds))
        return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["session"] = {
            "providers": (
                list(self._session.get_providers()) if self._session is not None else self.providers
            ),
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "graph_optimization_level": self.graph_optimization_level,
            "allow_spinning": self.allow_spinning,
        }
        return info


class TrtRunner(BaseRunner):
    """A serialized TensorRT engine (``.plan``), run with TensorRT 10's tensor-address API.

    Device buffers come from torch's CUDA allocator, so no extra CUDA binding is needed; both
    tensorrt and a CUDA build of torch are imported only in ``activate``.
    """

    backend = "tensorrt"

    def __init__(self, path: Path, *, name: str | None = None) -> None:
        super().__init__(path, name)
        self._engine: Any = None
        self._context: Any = None
        self._trt: Any = None
        self._torch: Any = None

    def activate(self) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendUnavailableError(
                f"Running {self.path} needs TensorRT; install it with pip install 'factorlm[tensorrt]'."
            ) from None
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a core dependency
            raise BackendUnavailableError("Running a TensorRT engine needs torch.") from None
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"Running {self.path} needs a CUDA GPU; none is visible.")
        if not self.path.is_file():
            raise ModelLoadError(f"Engine file {self.path} does not exist.")
        self._trt, self._torch = trt, torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise ModelLoadError(
                f"TensorRT could not deserialize {self.path}; it was built by another TensorRT "
                "version or for another GPU."
            )
        self._context = self._engine.create_execution_context()
        inputs: list[TensorMeta] = []
        outputs: list[TensorMeta] = []
        for i in range(self._engine.num_io_tensors):
            tname = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(tname))).name
            shape = tuple(d if d >= 0 else None for d in self._engine.get_tensor_shape(tname))
            meta = TensorMeta(tname, dtype, shape)
            is_input = self._engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(meta)
        self._inputs, self._outputs = tuple(inputs), tuple(outputs)

    def deactivate(self) -> None:
        self._context = None
        self._engine = None

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        keep: list[Any] = []
        for meta in self._inputs:
            array = np.ascontiguousarray(feeds[meta.name], dtype=np.dtype(meta.dtype))
            tensor = torch.from_numpy(array).cuda()
            keep.append(tensor)
            self._context.set_input_shape(meta.name, tuple(array.shape))
            self._context.set_tensor_address(meta.name, tensor.data_ptr())
        results: dict[str, Any] = {}
        for meta in self._outputs:
            shape = tuple(self._context.get_tensor_shape(meta.name))
            torch_dtype = torch.from_numpy(np.empty(0, dtype=np.dtype(meta.dtype))).dtype
            tensor = torch.empty(shape, dtype=torch_dtype, device="cuda")
            results[meta.name] = tensor
            self._context.set_tensor_address(meta.name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path} failed")
        stream.synchronize()
        return {n: t.cpu().numpy() for n, t in results.items()}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self._trt is not None:
            info["tensorrt_version"] = self._trt.__version__
        return info


@dataclass(frozen=True)
class ResolvedModel:
    """Where a user's ``--reference``/``--candidate`` argument points after folder resolution."""

    file: Path
    backend: str
    folder: Path | None
    manifest: dict[str, Any] | None


_ENGINE_FILES = (
    ("model.onnx", "onnxruntime"),
    ("model.ort", "onnxruntime"),
    ("model.plan", "tensorrt"),
)


def resolve_model(path: Path, backend: str = "auto") -> ResolvedModel:
    """Turn a file, an export folder or an engine folder with manifest.json into one engine file."""
    path = Path(path)
    if backend not in ("auto", "onnxruntime", "tensorrt"):
        raise ConfigError(f"Backend {backend!r} is not one of auto, onnxruntime, tensorrt.")
    if path.is_file():
        return ResolvedModel(path, backend if backend != "auto" else _backend_of(path), None, None)
    if not path.is_dir():
        raise ModelLoadError(f"Model {path} does not exist.")
    manifest = _read_manifest(path)
    candidates = [(path / f, b) for f, b in _ENGINE_FILES]
    if manifest is not None:
        named = [path / n for n in _manifest_files(manifest)]
        root = path.resolve()
        for file in named:
            if not file.resolve().is_relative_to(root):
                raise ModelLoadError(
                    f"Engine manifest {path / 'manifest.json'} points at {file}, outside the "
                    "engine folder; refusing to load it."
                )
        candidates = [(p, _backend_of(p)) for p in named if p.is_file()] + candidates
    for file, file_backend in candidates:
        if file.is_file() and backend in ("auto", file_backend):
            return ResolvedModel(file, file_backend, path, manifest)
    wanted = "a .plan engine" if backend == "tensorrt" else "model.onnx, model.ort or model.plan"
    raise ModelLoadError(f"Folder {path} holds no {wanted}.")


def load_runner(
    path: Path,
    *,
    name: str | None = None,
    backend: str = "auto",
    providers: Sequence[str] | None = None,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    graph_optimization_level: str = "all",
) -> BaseRunner:
    """Build (but do not activate) the runner for a model file or folder."""
    resolved = resolve_model(path, backend)
    label = name or _default_name(Path(path))
    runner: BaseRunner
    if resolved.backend == "tensorrt":
        runner = TrtRunner(resolved.file, name=label)
    else:
        runner = OrtRunner(
            resolved.file,
            name=label,
            providers=providers,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            graph_optimization_level=graph_optimization_level,
        )
    runner.folder = resolved.folder
    runner.manifest = resolved.manifest
    return runner


def _backend_of(path: Path) -> str:
    return "tensorrt" if path.suffix in (".plan", ".engine", ".trt") else "onnxruntime"


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    file = folder / "manifest.json"
    if not file.is_file():
        return None
    data = read_json(file, what="engine manifest", error=ModelLoadError)
    if not isinstance(data, dict):
        raise ModelLoadError(f"Engine manifest {file} is not a JSON object.")
    return data


def _manifest_files(manifest: Mapping[str, Any]) -> list[str]:
    """File names a manifest points at, whatever key the build stage used for them."""
    names: list[str] = []

    def visit(value: Any) -> None:
        if isinstance(value, str) and os.path.splitext(value)[1] in (".onnx", ".ort", ".plan"):
            if not os.path.isabs(value):
                names.append(value)
        elif isinstance(value, Mapping):
            for key in ("engine", "file", "path", "model", "files", "engines", "artifacts"):
                if key in value:
                    visit(value[key])
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)

    visit(manifest)
    return names


def _default_name(path: Path) -> str:
    if path.is_dir():
        return path.resolve().name
    if path.stem in ("model", "model_optimized") and path.parent.name:
        return path.resolve().parent.name
    return path.stem


def _ort_meta(meta: Any) -> TensorMeta:
    dtype = np.dtype(_ORT_TYPES.get(meta.type, np.float32)).name
    shape = tuple(d if isinstance(d, int | str) else None for d in meta.shape)
    return TensorMeta(meta.name, dtype, shape)
