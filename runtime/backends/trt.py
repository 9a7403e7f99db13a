"""TensorRT backend: one engine per bucket, picked per call by the shapes of the request.

For each graph, the engines of all compiled buckets are deserialised; each gets one execution context, and the
contexts share one activation allocation (the largest ``device_memory_size``: they run one after another on one
stream). Input/output device buffers are allocated once per bucket at the profile's max shapes and bound with
``set_tensor_address`` at activation, so a call is: pick the smallest bucket whose profile holds the shapes,
``set_input_shape``, copy inputs in, ``execute_async_v3`` (or replay the CUDA graph captured for that bucket and
shape), copy outputs out. Host I/O is numpy float32 (bool/int32 where the graph says so), as for the other
backends. tensorrt and cuda-python are imported on activation only, so this module imports without them.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._lazy import require
from ..errors import BackendError, ManifestError, MissingDependencyError
from ..fileio import sha256_file
from ..graphs import DIT, GRAPH_NAMES, graph_io
from ..manifest import EngineSpec, Manifest, ModelConfig, TensorSpec
from ..precision import ENGINE_PREFERENCE, VAE_ENGINE_PREFERENCE
from .base import Backend

logger = logging.getLogger(__name__)

DIT_PRECISION_ORDER = ENGINE_PREFERENCE  # precision=None picks the first with DiT engines
VAE_PRECISION_ORDER = VAE_ENGINE_PREFERENCE
MAX_CUDA_GRAPHS = 32  # captured graphs kept per backend (LRU)


# ---------------------------------------------------------------------------------------------------------
# cuda-python helpers
# ---------------------------------------------------------------------------------------------------------


def load_cudart():
    """The cuda-python runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before cuda-python 12.6).

    Raises:
        MissingDependencyError: cuda-python is not installed.
    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as err:
            raise MissingDependencyError(
                f"cuda-python is required for the TensorRT backend but cannot be imported ({err}).",
                "pip install 'uniref-deploy[gpu]'",
            ) from err
    return cudart


def cuda_call(result):
    """Unpack a cuda-python ``(err, *values)`` result; raise ``BackendError`` naming the CUDA error."""
    cudart = load_cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        raise BackendError(f"CUDA call failed: {name.decode() if isinstance(name, bytes) else name}.")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU an engine is built for or runs on."""

    name: str
    compute_capability: str  # "9.0"


def device_info(device: int = 0) -> DeviceInfo:
    """Name and compute capability of CUDA device ``device``.

    Raises:
        MissingDependencyError: cuda-python is missing.
        BackendError: no usable GPU (the CUDA error is named).
    """
    cudart = load_cudart()
    props = cuda_call(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name.rstrip("\x00").strip(), f"{props.major}.{props.minor}")


def _trt():
    return require("tensorrt", extra="gpu")


# ---------------------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------------------


class _Bucket:
    """One engine with its context, profile and device buffers."""

    def __init__(self, spec: EngineSpec, engine, profile: dict[str, tuple[tuple[int, ...], ...]]):
        self.spec, self.engine, self.profile = spec, engine, profile
        self.context: Any = None  # tensorrt.IExecutionContext while active
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.dtypes: dict[str, np.dtype] = {}
        self.axis_ranges: dict[str, tuple[int, int]] = {}

    def holds(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        for name, shape in shapes.items():
            lo, _, hi = self.profile[name]
            if len(shape) != len(lo) or any(n < a or n > b for a, n, b in zip(lo, shape, hi, strict=True)):
                return False
        return True

    def describe(self) -> str:
        ranges = ", ".join(f"{a} {lo}..{hi}" for a, (lo, hi) in self.axis_ranges.items())
        return f"b{self.spec.budget.name} ({ranges})"


class TrtBackend(Backend):
    """One graph over the TensorRT engines of every compiled bucket.

    Args:
        name: graph name ("dit", "vae_encoder", "vae_decoder").
        inputs: the graph's input specs.
        outputs: the graph's output specs.
        engines: the manifest's engine entries of this graph (one per bucket, one precision).
        art_dir: the artifact folder holding the engine files.
        cuda_graphs: capture one CUDA graph per (bucket, input shapes) and replay it on later calls.
        verify: check each plan file's sha256 against the manifest before loading.
        weight_streaming_budget: bytes of weights kept on the GPU for weight-streamable engines (default:
            the budget recorded at build time, if any).
        device: CUDA device ordinal.
    """

    kind = "trt"
    fixed_buckets = True

    def __init__(self, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 engines: tuple[EngineSpec, ...], art_dir: str | os.PathLike, cuda_graphs: bool = False,
                 verify: bool = True, weight_streaming_budget: int | None = None, device: int = 0):
        super().__init__(name, inputs, outputs)
        if not engines:
            raise BackendError(f"No TensorRT engines for graph '{name}'.", "run `uniref-deploy build ART`.")
        self.engine_specs = tuple(sorted(engines, key=lambda e: e.budget))
        self.art_dir = Path(art_dir)
        self.cuda_graphs, self.verify, self.device = cuda_graphs, verify, device
        self.weight_streaming_budget = weight_streaming_budget
        self.last_gpu_ms: float | None = None
        self._buckets: list[_Bucket] = []
        self._runtime: Any = None  # tensorrt.Runtime, CUDA stream and (start, end) events while active
        self._stream: Any = None
        self._events: Any = None
        self._activation: tuple[int, int] | None = None
        self._graphs: OrderedDict[tuple, object] = OrderedDict()
        self._no_capture: set[tuple] = set()

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def _activate(self) -> None:
        trt, cudart = _trt(), load_cudart()
        cuda_call(cudart.cudaSetDevice(self.device))
        running = DeviceInfo("", "")
        try:
            running = device_info(self.device)
            for spec in self.engine_specs:
                check_provenance(spec, trt.__version__, running.compute_capability)
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._stream = cuda_call(cudart.cudaStreamCreate())
            self._events = (cuda_call(cudart.cudaEventCreate()), cuda_call(cudart.cudaEventCreate()))
            self._buckets = [self._load(spec, trt) for spec in self.engine_specs]
            self._bind_memory(trt)
        except BaseException:
            self._deactivate()
            raise
        logger.info("TensorRT %s on %s: %s buckets %s", trt.__version__, running.name, self.name,
                    ", ".join(f"b{b.spec.budget.name}" for b in self._buckets))

    def _load(self, spec: EngineSpec, trt) -> _Bucket:
        path = self.art_dir / spec.file
        if not path.is_file():
            raise ManifestError(f"Engine file '{path}' is missing.", "run `uniref-deploy build` for these artifacts.")
        if self.verify and sha256_file(path) != spec.sha256:
            raise ManifestError(f"Engine file '{path}' does not match the manifest's sha256 (damaged or replaced).",
                                "re-run `uniref-deploy build`.")
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(f"TensorRT could not deserialise '{path}'.",
                               "rebuild it with this TensorRT version on this GPU (`uniref-deploy build`).")
        budget = self.weight_streaming_budget
        if budget is None:
            budget = spec.provenance.get("weight_streaming_budget")
        if budget is not None and getattr(engine, "streamable_weights_size", 0) > 0:
            engine.weight_streaming_budget_v2 = int(budget)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        expected = {s.name for s in self.inputs} | {s.name for s in self.outputs}
        if set(names) != expected:
            raise BackendError(f"Engine '{path}' has tensors {sorted(names)}, expected {sorted(expected)}.",
                               "the engine was built from another graph; re-run `uniref-deploy build`.")
        profile = {n: _profile_shapes(engine, n) for n in inputs}
        bucket = _Bucket(spec, engine, profile)
        bucket.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        for s in self.inputs:
            for i, axis in s.dynamic_axes.items():
                lo, _, hi = profile[s.name]
                bucket.axis_ranges.setdefault(axis, (lo[i], hi[i]))
        return bucket

    def _bind_memory(self, trt) -> None:
        """One shared activation allocation; per-bucket I/O buffers at max shapes, bound once."""
        cudart = load_cudart()
        size = max(_device_memory_size(b.engine) for b in self._buckets)
        self._activation = (cuda_call(cudart.cudaMalloc(max(size, 1))), size)
        for b in self._buckets:
            b.context = _user_managed_context(b.engine, trt)
            if b.context is None:
                raise BackendError(f"TensorRT could not create an execution context for '{b.spec.file}'.")
            if hasattr(b.context, "set_device_memory"):
                b.context.set_device_memory(self._activation[0], size)
            else:
                b.context.device_memory = self._activation[0]
            for name, (_, _, hi) in b.profile.items():
                b.context.set_input_shape(name, hi)
            for name, dtype in b.dtypes.items():
                shape = b.profile[name][2] if name in b.profile else tuple(b.context.get_tensor_shape(name))
                nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
                ptr = cuda_call(cudart.cudaMalloc(nbytes))
                b.buffers[name] = (ptr, nbytes)
                b.context.set_tensor_address(name, ptr)

    def _deactivate(self) -> None:
        cudart = load_cudart()
        for graph_exec in self._graphs.values():
            cudart.cudaGraphExecDestroy(graph_exec)
        self._graphs.clear()
        self._no_capture.clear()
        for b in self._buckets:
            b.context = None
            for ptr, _ in b.buffers.values():
                cudart.cudaFree(ptr)
            b.buffers.clear()
            b.engine = None
        self._buckets = []
        if self._activation is not None:
            cudart.cudaFree(self._activation[0])
            self._activation = None
        for event in self._events or ():
            cudart.cudaEventDestroy(event)
        self._events = None
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._runtime = None

    # ---- inference ---------------------------------------------------------------------------------------
    def select_bucket(self, shapes: dict[str, tuple[int, ...]]) -> _Bucket:
        """The smallest bucket whose profile holds ``shapes``.

        Raises:
            BackendError: no compiled bucket holds them (the axis sizes and bucket ranges are named).
        """
        for b in self._buckets:
            if b.holds(shapes):
                return b
        sizes: dict[str, int] = {}
        for s in self.inputs:
            for i, axis in s.dynamic_axes.items():
                sizes.setdefault(axis, shapes[s.name][i])
        request = ", ".join(f"{a}={n}" for a, n in sizes.items())
        compiled = "; ".join(b.describe() for b in self._buckets)
        raise BackendError(
            f"No compiled TensorRT bucket of '{self.name}' holds this request ({request}); compiled: {compiled}.",
            "use fewer or smaller references (or the self policy), build a larger bucket with "
            "`uniref-deploy build ART --budgets ...`, or run with the ort backend.",
        )

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = load_cudart()
        shapes = {name: tuple(arr.shape) for name, arr in feeds.items()}
        b = self.select_bucket(shapes)
        ctx, stream = b.context, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        staged = []
        for name, arr in feeds.items():
            host = np.ascontiguousarray(arr, dtype=b.dtypes[name])
            staged.append(host)
            if not ctx.set_input_shape(name, host.shape):
                raise BackendError(f"TensorRT rejected shape {host.shape} for input '{name}' of '{self.name}'.")
            cuda_call(cudart.cudaMemcpyAsync(b.buffers[name][0], host.ctypes.data, host.nbytes, h2d, stream))
        cuda_call(cudart.cudaEventRecord(self._events[0], stream))
        self._execute(b, tuple(sorted(shapes.items())))
        cuda_call(cudart.cudaEventRecord(self._events[1], stream))
        outputs = {}
        for spec in self.outputs:
            out = np.empty(tuple(ctx.get_tensor_shape(spec.name)), dtype=b.dtypes[spec.name])
            cuda_call(cudart.cudaMemcpyAsync(out.ctypes.data, b.buffers[spec.name][0], out.nbytes, d2h, stream))
            outputs[spec.name] = out
        cuda_call(cudart.cudaStreamSynchronize(stream))
        self.last_gpu_ms = float(cuda_call(cudart.cudaEventElapsedTime(*self._events)))
        return {name: out.astype(np.float32) if out.dtype.kind == "f" and out.dtype != np.float32 else out
                for name, out in outputs.items()}

    def _execute(self, b: _Bucket, shape_key: tuple) -> None:
        """Enqueue the engine, or replay (capturing on first sight) the CUDA graph of this bucket and shape."""
        cudart = load_cudart()
        key = (b.spec.budget, shape_key)
        if self.cuda_graphs and key in self._graphs:
            self._graphs.move_to_end(key)
            cuda_call(cudart.cudaGraphLaunch(self._graphs[key], self._stream))
            return
        if not b.context.execute_async_v3(int(self._stream)):
            raise BackendError(f"TensorRT failed to run '{self.name}' ({b.spec.file}).", "run with -vv for TensorRT's log.")
        if self.cuda_graphs and key not in self._no_capture:
            self._capture(b, key)

    def _capture(self, b: _Bucket, key: tuple) -> None:
        """Capture one enqueue (after a plain run, so shape-dependent setup is done) for later replays."""
        cudart = load_cudart()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        cuda_call(cudart.cudaStreamBeginCapture(self._stream, mode))
        ok = b.context.execute_async_v3(int(self._stream))
        err, graph = cudart.cudaStreamEndCapture(self._stream)
        if not ok or err != cudart.cudaError_t.cudaSuccess:
            logger.warning("CUDA graph capture failed for %s %s; running without a graph", self.name, key[1])
            if graph is not None and int(graph):
                cudart.cudaGraphDestroy(graph)
            self._no_capture.add(key)
            return
        graph_exec = cuda_call(cudart.cudaGraphInstantiate(graph, 0))
        cudart.cudaGraphDestroy(graph)
        self._graphs[key] = graph_exec
        if len(self._graphs) > MAX_CUDA_GRAPHS:
            _, oldest = self._graphs.popitem(last=False)
            cudart.cudaGraphExecDestroy(oldest)


def _profile_shapes(engine, name: str) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) of input ``name`` in profile 0; a static input's own shape three times."""
    static = tuple(engine.get_tensor_shape(name))
    if all(n >= 0 for n in static):
        return (static, static, static)
    return tuple(tuple(d) for d in engine.get_tensor_profile_shape(name, 0))


def _user_managed_context(engine, trt):
    """An execution context whose activation memory the caller provides (TensorRT 10: strategy USER_MANAGED)."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:
        try:
            return engine.create_execution_context(strategy.USER_MANAGED)
        except TypeError:  # a binding without the strategy overload
            pass
    return engine.create_execution_context_without_device_memory()


def _device_memory_size(engine) -> int:
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


def check_provenance(spec: EngineSpec, tensorrt_version: str, compute_capability: str) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU architecture.

    Raises:
        BackendError: the recorded TensorRT version or compute capability differs from the running one.
    """
    built_trt = spec.provenance.get("tensorrt_version")
    if built_trt is not None and built_trt != tensorrt_version:
        raise BackendError(
            f"Engine '{spec.file}' was built with TensorRT {built_trt}, but TensorRT {tensorrt_version} is running.",
            "rebuild the engines here with `uniref-deploy build ART`.",
        )
    built_cc = spec.provenance.get("compute_capability")
    if built_cc is not None and str(built_cc) != compute_capability:
        raise BackendError(
            f"Engine '{spec.file}' was built for compute capability {built_cc} ({spec.provenance.get('gpu_name', '?')}), "
            f"but this GPU has compute capability {compute_capability}.",
            "rebuild the engines on this GPU with `uniref-deploy build ART`.",
        )


# ---------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------


def _pick_precision(manifest: Manifest, name: str, wanted: str | None, order: tuple[str, ...]) -> str:
    have = {e.precision for e in manifest.engines if e.graph == name}
    candidates = ((wanted,) if wanted else ()) + (order if name != DIT or wanted is None else ())
    for p in candidates:
        if p in have:
            return p
    listing = ", ".join(sorted(f"{e.graph}.b{e.budget.name}.{e.precision}" for e in manifest.engines)) or "none"
    want = f" at precision '{wanted}'" if wanted and name == DIT else ""
    raise BackendError(
        f"The artifacts have no TensorRT engines for '{name}'{want} (have: {listing}).",
        f"run `uniref-deploy build ART --precision {wanted or 'fp16'}`, or use the ort backend.",
    )


class TrtBackendFactory:
    """Builds the three TensorRT backends of an artifact folder from its manifest's engines."""

    @staticmethod
    def create(config: ModelConfig, art_dir: str | os.PathLike, manifest: Manifest | None = None,
               precision: str | None = "fp16", **options) -> dict[str, Backend]:
        """One ``TrtBackend`` per graph.

        Args:
            config: the model configuration.
            art_dir: the artifact folder.
            manifest: its manifest (loaded when None).
            precision: DiT engine precision; None picks the first of fp16, bf16, fp8, fp32 that was built. The
                VAE engines use this precision when built, else fp16, else fp32.
            **options: passed to ``TrtBackend`` (cuda_graphs, verify, weight_streaming_budget, device).

        Returns:
            dict[str, Backend]: graph name -> backend (not yet activated).

        Raises:
            BackendError: a graph has no engines at a usable precision.
        """
        manifest = manifest or Manifest.load(art_dir)
        backends: dict[str, Backend] = {}
        for name in GRAPH_NAMES:
            order = DIT_PRECISION_ORDER if name == DIT else VAE_PRECISION_ORDER
            p = _pick_precision(manifest, name, precision, order)
            engines = tuple(e for e in manifest.engines if e.graph == name and e.precision == p)
            if manifest.has_graph(name, p):
                spec = manifest.graph(name, p)
                inputs, outputs = spec.inputs, spec.outputs
            else:
                inputs, outputs = graph_io(name, config)
            backends[name] = TrtBackend(name, inputs, outputs, engines, art_dir, **options)
        return backends
