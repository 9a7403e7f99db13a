"""TensorRT backend: one engine per graph and precision, one optimization profile per compiled bucket.

Activation deserialises the graph's plan once and makes one execution context per profile, each bound with
``set_optimization_profile_async``. Contexts use user-managed device memory: every stage's contexts share one
``SharedActivation`` (sized to the largest ``device_memory_size_v2``; stages run one after another). Input and
output device buffers are allocated once, each at the largest shape any profile allows, and bound to every
context. A call picks the smallest profile whose ranges (read from the engine with
``get_tensor_profile_shape``) hold the request, sets the input shapes, copies inputs in, runs
``execute_async_v3`` (or a CUDA graph of that profile and shapes, ``trt_graphs.py``) and copies outputs out.
Host I/O is numpy float32 (bool/int32 where the graph says so), as for the other backends. tensorrt and
cuda-python are imported on activation only, so this module imports without them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from .._lazy import require
from ..budget import Budget
from ..cuda import SharedActivation, cuda_call, device_alloc, device_free, device_info, load_cudart
from ..errors import BackendError
from ..graphs import DIT, GRAPH_NAMES, graph_io
from ..manifest import EngineSpec, Manifest, ModelConfig, TensorSpec
from ..precision import ENGINE_PREFERENCE, VAE_ENGINE_PREFERENCE
from .base import Backend
from .trt_engine import LoadedEngine, Shape, create_context, load_engine, set_shapes
from .trt_graphs import MAX_CUDA_GRAPHS, GraphCache

logger = logging.getLogger(__name__)

DIT_PRECISION_ORDER = ENGINE_PREFERENCE  # precision=None picks the first with a DiT engine
VAE_PRECISION_ORDER = VAE_ENGINE_PREFERENCE


class TrtBackend(Backend):
    """One graph on its TensorRT engine (one profile per compiled bucket).

    Args:
        name: graph name ("dit", "vae_encoder", "vae_decoder").
        inputs: the graph's input specs.
        outputs: the graph's output specs.
        engine: the manifest's engine entry for this graph.
        art_dir: the artifact folder holding the engine file.
        cuda_graphs: capture one CUDA graph per (profile, input shapes), each on its own context, and replay it.
        verify: check the plan file's sha256 against the manifest before loading.
        weight_streaming_budget: bytes of weights kept on the GPU for weight-streamable engines (default: the
            budget recorded at build time, if any).
        device: CUDA device ordinal.
        activation: the activation memory shared with the other stages (a private one when None).
        max_cuda_graphs: captured graphs kept (LRU).
    """

    kind = "trt"
    fixed_buckets = True

    def __init__(self, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 engine: EngineSpec | None, art_dir: str | os.PathLike, cuda_graphs: bool = False,
                 verify: bool = True, weight_streaming_budget: int | None = None, device: int = 0,
                 activation: SharedActivation | None = None, max_cuda_graphs: int = MAX_CUDA_GRAPHS):
        super().__init__(name, inputs, outputs)
        if engine is None:
            raise BackendError(f"No TensorRT engine for graph '{name}'.", "run `uniref-deploy build ART`.")
        self.engine_spec = engine
        self.art_dir = art_dir
        self.cuda_graphs, self.verify, self.device = cuda_graphs, verify, device
        self.weight_streaming_budget = weight_streaming_budget
        self.activation = activation or SharedActivation()
        self.last_gpu_ms: float | None = None
        self.last_profile: int | None = None
        self._trt: Any = None
        self._engine: LoadedEngine | None = None
        self._runtime: Any = None
        self._stream: Any = None
        self._events: tuple[Any, Any] | None = None
        self._contexts: list[Any] = []  # one per profile (plain enqueues)
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._graphs = GraphCache(name, self._graph_context, max_cuda_graphs)

    @property
    def budgets(self) -> tuple[Budget, ...]:
        """The bucket of each optimization profile."""
        return tuple(Budget.from_pixels(b) for b in self.engine_spec.budgets)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def _activate(self) -> None:
        trt, cudart = require("tensorrt", extra="gpu"), load_cudart()
        self._trt = trt
        cuda_call(cudart.cudaSetDevice(self.device))
        try:
            running = device_info(self.device)
            check_provenance(self.engine_spec, trt.__version__, running.compute_capability)
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._stream = cuda_call(cudart.cudaStreamCreate())
            self._events = (cuda_call(cudart.cudaEventCreate()), cuda_call(cudart.cudaEventCreate()))
            budget = self.weight_streaming_budget
            if budget is None:
                budget = self.engine_spec.provenance.get("weight_streaming_budget")
            expected = {s.name for s in (*self.inputs, *self.outputs)}
            self._engine = load_engine(trt, self._runtime, self.engine_spec, self.art_dir, expected, self.verify,
                                       budget)
            self._bind()
        except BaseException:
            self._deactivate()
            raise
        logger.info("TensorRT %s on %s: %s with profiles %s", trt.__version__, running.name, self.name,
                    ", ".join(f"b{b.name}" for b in self.budgets))

    def _bind(self) -> None:
        """Shared activation memory, one context per profile, I/O buffers at the largest shapes, bound once."""
        assert self._engine is not None
        engine = self._engine
        memory = self.activation.acquire(self, engine.device_memory_size(), self._on_activation_moved)
        self._contexts = [create_context(self._trt, engine, i, int(self._stream), memory, {})
                          for i in range(len(engine.profiles))]
        sizes: dict[str, int] = {}
        for i, ctx in enumerate(self._contexts):
            set_shapes(ctx, {n: hi for n, (_, _, hi) in engine.profiles[i].items()}, self.name)
            for name in (*engine.inputs, *engine.outputs):
                nbytes = int(np.prod(tuple(ctx.get_tensor_shape(name)))) * engine.dtypes[name].itemsize
                sizes[name] = max(sizes.get(name, 0), nbytes)
        for name, nbytes in sizes.items():
            self._buffers[name] = (device_alloc(nbytes), nbytes)
        for ctx in self._contexts:
            for name, (ptr, _) in self._buffers.items():
                ctx.set_tensor_address(name, ptr)

    def _on_activation_moved(self, ptr: int, size: int) -> None:
        """Another stage grew the shared activation buffer: rebind, and drop graphs that captured the old one."""
        for ctx in self._contexts:
            ctx.set_device_memory(ptr, size)
        self._graphs.clear()

    def _deactivate(self) -> None:
        cudart = load_cudart()
        self._graphs.clear()
        self._contexts = []
        for ptr, _ in self._buffers.values():
            device_free(ptr)
        self._buffers.clear()
        self.activation.release(self)
        self._engine = None
        for event in self._events or ():
            cudart.cudaEventDestroy(event)
        self._events = None
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._runtime = None

    # ---- inference ---------------------------------------------------------------------------------------
    def select_profile(self, shapes: dict[str, Shape]) -> int:
        """The smallest bucket's profile that holds ``shapes``.

        Raises:
            BackendError: no compiled bucket holds them (the axis sizes and each profile's ranges are named).
        """
        assert self._engine is not None
        for i in sorted(range(len(self._engine.profiles)), key=lambda i: self.engine_spec.budgets[i]):
            if self._engine.holds(i, shapes):
                return i
        sizes: dict[str, int] = {}
        ranges: list[dict[str, tuple[int, int]]] = [{} for _ in self._engine.profiles]
        for s in self.inputs:
            for axis_index, axis in s.dynamic_axes.items():
                sizes.setdefault(axis, shapes[s.name][axis_index])
                for i, profile in enumerate(self._engine.profiles):
                    lo, _, hi = profile[s.name]
                    ranges[i].setdefault(axis, (lo[axis_index], hi[axis_index]))
        request = ", ".join(f"{a}={n}" for a, n in sizes.items())
        compiled = "; ".join(f"b{b.name} (" + ", ".join(f"{a} {lo}..{hi}" for a, (lo, hi) in r.items()) + ")"
                             for b, r in zip(self.budgets, ranges, strict=True))
        raise BackendError(
            f"No compiled TensorRT profile of '{self.name}' holds this request ({request}); compiled: {compiled}.",
            "use fewer or smaller references (or the self policy), build a larger bucket with "
            "`uniref-deploy build ART --budgets ...`, or run with the ort backend.",
        )

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self._engine is not None and self._events is not None
        cudart = load_cudart()
        shapes = {name: tuple(arr.shape) for name, arr in feeds.items()}
        profile = self.select_profile(shapes)
        stream = self._stream
        staged = []
        for name, arr in feeds.items():
            host = np.ascontiguousarray(arr, dtype=self._engine.dtypes[name])
            staged.append(host)  # alive until the stream is synchronised
            cuda_call(cudart.cudaMemcpyAsync(self._buffers[name][0], host.ctypes.data, host.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
        cuda_call(cudart.cudaEventRecord(self._events[0], stream))
        if self.cuda_graphs:
            ctx = self._graphs.run((profile, tuple(sorted(shapes.items()))), int(stream))
        else:
            ctx = self._contexts[profile]
            set_shapes(ctx, shapes, self.name)
            if not ctx.execute_async_v3(int(stream)):
                raise BackendError(f"TensorRT failed to run '{self.name}' ({self.engine_spec.file}).",
                                   "run with -vv for TensorRT's log.")
        cuda_call(cudart.cudaEventRecord(self._events[1], stream))
        outputs = {}
        for spec in self.outputs:
            out = np.empty(tuple(ctx.get_tensor_shape(spec.name)), dtype=self._engine.dtypes[spec.name])
            cuda_call(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[spec.name][0], out.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
            outputs[spec.name] = out
        cuda_call(cudart.cudaStreamSynchronize(stream))
        self.last_gpu_ms = float(cuda_call(cudart.cudaEventElapsedTime(*self._events)))
        self.last_profile = profile
        return {name: out.astype(np.float32) if out.dtype.kind == "f" and out.dtype != np.float32 else out
                for name, out in outputs.items()}

    def _graph_context(self, key: tuple) -> Any:
        """A fresh context for CUDA-graph key ``(profile, shapes)``: bound to the profile, memory and buffers."""
        assert self._engine is not None and self.activation.ptr is not None
        profile, shapes = key
        ctx = create_context(self._trt, self._engine, profile, int(self._stream),
                             (self.activation.ptr, self.activation.size),
                             {name: ptr for name, (ptr, _) in self._buffers.items()})
        set_shapes(ctx, dict(shapes), self.name)
        return ctx


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


def _pick_engine(manifest: Manifest, name: str, wanted: str | None, order: tuple[str, ...]) -> EngineSpec:
    have = {e.precision: e for e in manifest.engines if e.graph == name}
    candidates = ((wanted,) if wanted else ()) + (order if name != DIT or wanted is None else ())
    for p in candidates:
        if p in have:
            return have[p]
    listing = ", ".join(sorted(e.name for e in manifest.engines)) or "none"
    want = f" at precision '{wanted}'" if wanted and name == DIT else ""
    raise BackendError(
        f"The artifacts have no TensorRT engine for '{name}'{want} (have: {listing}).",
        f"run `uniref-deploy build ART --precision {wanted or 'fp16'}`, or use the ort backend.",
    )


class TrtBackendFactory:
    """Builds the three TensorRT backends of an artifact folder from its manifest's engines."""

    @staticmethod
    def create(config: ModelConfig, art_dir: str | os.PathLike, manifest: Manifest | None = None,
               precision: str | None = "fp16", **options: Any) -> dict[str, Backend]:
        """One ``TrtBackend`` per graph, all sharing one activation buffer.

        Args:
            config: the model configuration.
            art_dir: the artifact folder.
            manifest: its manifest (loaded when None).
            precision: DiT engine precision; None picks the first of fp16, bf16, fp8, fp32 that was built. The
                VAE engines use this precision when built, else fp16, else fp32.
            **options: passed to ``TrtBackend`` (cuda_graphs, verify, weight_streaming_budget, device,
                max_cuda_graphs).

        Returns:
            dict[str, Backend]: graph name -> backend (not yet activated).

        Raises:
            BackendError: a graph has no engine at a usable precision.
        """
        manifest = manifest or Manifest.load(art_dir)
        shared = SharedActivation()
        backends: dict[str, Backend] = {}
        for name in GRAPH_NAMES:
            order = DIT_PRECISION_ORDER if name == DIT else VAE_PRECISION_ORDER
            engine = _pick_engine(manifest, name, precision, order)
            if manifest.has_graph(name, engine.precision):
                spec = manifest.graph(name, engine.precision)
                inputs, outputs = spec.inputs, spec.outputs
            else:
                inputs, outputs = graph_io(name, config)
            backends[name] = TrtBackend(name, inputs, outputs, engine, art_dir, activation=shared, **options)
        return backends
