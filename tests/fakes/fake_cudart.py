"""Test-only stand-in for cuda-python's runtime module (``cuda.bindings.runtime``): never importable outside tests.

"Device" memory is host memory (numpy buffers) behind fake device pointers; stream work runs at once, except on
a capturing stream, where it is recorded into a graph that ``cudaGraphLaunch`` replays. It implements only the
names this project calls. Each name and its ``(err, *values)`` return shape was checked against NVIDIA/cuda-python,
``cuda_bindings/cuda/bindings/runtime.pyx.in`` (and the installed cuda-bindings 13.5 module's signatures):
``cudaError_t`` (values as in CUDA), ``cudaGetErrorName``, ``cudaGetLastError``, ``cudaGetDeviceCount``,
``cudaSetDevice``, ``cudaGetDeviceProperties`` (``.name`` bytes, ``.major``, ``.minor``), ``cudaMalloc``,
``cudaFree``, ``cudaMemcpyAsync`` + ``cudaMemcpyKind``, ``cudaStreamCreate``, ``cudaStreamDestroy``,
``cudaStreamSynchronize``, ``cudaEventCreate``, ``cudaEventRecord``, ``cudaEventElapsedTime``,
``cudaEventDestroy``, ``cudaStreamBeginCapture`` + ``cudaStreamCaptureMode``, ``cudaStreamEndCapture``,
``cudaGraphInstantiate``, ``cudaGraphLaunch``, ``cudaGraphDestroy``, ``cudaGraphExecDestroy``.

Like CUDA: an error a call returns is also kept as the "last error" until ``cudaGetLastError`` reads it;
synchronising a capturing stream invalidates the capture; ``cudaStreamEndCapture`` of an invalidated capture
returns ``cudaErrorStreamCaptureInvalidated`` and no graph; copies outside an allocation fail.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


class cudaError_t(enum.IntEnum):  # noqa: N801 - CUDA's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevicePointer = 17
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


@dataclass
class cudaDeviceProp:  # noqa: N801
    name: bytes = b"Fake GPU (tests/fakes)"
    major: int = 9
    minor: int = 0


@dataclass
class _Capture:
    mode: cudaStreamCaptureMode
    ops: list[Callable[[], None]] = field(default_factory=list)
    invalid: bool = False


class FakeDevice:
    """The state behind the module functions; ``reset()`` gives a fresh device."""

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        self.pointers = itertools.count(0x7F00_0000_0000, 1 << 32)  # 256-byte aligned, far apart
        self.handles = itertools.count(1)
        self.streams: set[int] = set()
        self.events: dict[int, float] = {}
        self.graphs: dict[int, list[Callable[[], None]]] = {}
        self.execs: dict[int, list[Callable[[], None]]] = {}
        self.captures: dict[int, _Capture] = {}
        self.capture_modes: list[cudaStreamCaptureMode] = []
        self.last_error = cudaError_t.cudaSuccess
        self.props = cudaDeviceProp()
        self.count = 1
        self.fail_captures = False  # make every capture invalid (as an unsupported call inside it would)

    # ---- memory ---------------------------------------------------------------------------------------------
    def region(self, ptr: int, nbytes: int) -> np.ndarray:
        """The bytes ``[ptr, ptr + nbytes)`` of one allocation; raises like an illegal access otherwise."""
        for base, buf in self.memory.items():
            if base <= ptr < base + buf.size:
                if ptr + nbytes > base + buf.size:
                    raise RuntimeError(f"fake CUDA: access of {nbytes} bytes at {ptr:#x} runs past its allocation")
                return buf[ptr - base: ptr - base + nbytes]
        raise RuntimeError(f"fake CUDA: {ptr:#x} is not device memory")

    def capturing(self, stream: int) -> _Capture | None:
        return self.captures.get(int(stream))

    def submit(self, stream: int, op: Callable[[], None]) -> None:
        """Run ``op`` now, or record it when ``stream`` is capturing."""
        capture = self.capturing(stream)
        if capture is None:
            op()
        else:
            capture.ops.append(op)


DEVICE = FakeDevice()


def reset() -> FakeDevice:
    global DEVICE
    DEVICE = FakeDevice()
    return DEVICE


def _fail(err: cudaError_t) -> cudaError_t:
    DEVICE.last_error = err
    return err


# ---- errors and devices --------------------------------------------------------------------------------------
def cudaGetErrorName(error):  # noqa: N802
    return (cudaError_t.cudaSuccess, cudaError_t(error).name.encode())


def cudaGetLastError():  # noqa: N802
    err, DEVICE.last_error = DEVICE.last_error, cudaError_t.cudaSuccess
    return (err,)


def cudaGetDeviceCount():  # noqa: N802
    return (cudaError_t.cudaSuccess, DEVICE.count)


def cudaSetDevice(device):  # noqa: N802
    return (cudaError_t.cudaSuccess if 0 <= device < DEVICE.count else _fail(cudaError_t.cudaErrorInvalidValue),)


def cudaGetDeviceProperties(device):  # noqa: N802
    if not 0 <= device < DEVICE.count:
        return (_fail(cudaError_t.cudaErrorInvalidValue), None)
    return (cudaError_t.cudaSuccess, DEVICE.props)


# ---- memory ---------------------------------------------------------------------------------------------------
def cudaMalloc(size):  # noqa: N802
    ptr = next(DEVICE.pointers)
    DEVICE.memory[ptr] = np.zeros(int(size), dtype=np.uint8)  # calloc: pages are touched only when written
    return (cudaError_t.cudaSuccess, ptr)


def cudaFree(devPtr):  # noqa: N802, N803
    if DEVICE.memory.pop(int(devPtr), None) is None:
        return (_fail(cudaError_t.cudaErrorInvalidDevicePointer),)
    return (cudaError_t.cudaSuccess,)


def cudaMemcpyAsync(dst, src, count, kind, stream):  # noqa: N802
    def copy() -> None:
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            target = DEVICE.region(int(dst), count)
            ctypes.memmove(target.ctypes.data, int(src), count)
        else:
            source = DEVICE.region(int(src), count)
            ctypes.memmove(int(dst), source.ctypes.data, count)

    try:
        DEVICE.submit(stream, copy)
    except RuntimeError:
        return (_fail(cudaError_t.cudaErrorInvalidValue),)
    return (cudaError_t.cudaSuccess,)


# ---- streams and events -----------------------------------------------------------------------------------------
def cudaStreamCreate():  # noqa: N802
    handle = next(DEVICE.handles)
    DEVICE.streams.add(handle)
    return (cudaError_t.cudaSuccess, handle)


def cudaStreamDestroy(stream):  # noqa: N802
    DEVICE.streams.discard(int(stream))
    return (cudaError_t.cudaSuccess,)


def cudaStreamSynchronize(stream):  # noqa: N802
    capture = DEVICE.capturing(stream)
    if capture is not None:  # not allowed while capturing: the capture is invalidated
        capture.invalid = True
        return (_fail(cudaError_t.cudaErrorStreamCaptureUnsupported),)
    return (cudaError_t.cudaSuccess,)


def cudaEventCreate():  # noqa: N802
    handle = next(DEVICE.handles)
    DEVICE.events[handle] = 0.0
    return (cudaError_t.cudaSuccess, handle)


def cudaEventRecord(event, stream):  # noqa: N802
    DEVICE.events[int(event)] = time.perf_counter()
    return (cudaError_t.cudaSuccess,)


def cudaEventElapsedTime(start, end):  # noqa: N802
    return (cudaError_t.cudaSuccess, (DEVICE.events[int(end)] - DEVICE.events[int(start)]) * 1e3)


def cudaEventDestroy(event):  # noqa: N802
    DEVICE.events.pop(int(event), None)
    return (cudaError_t.cudaSuccess,)


# ---- graphs ---------------------------------------------------------------------------------------------------------
def cudaStreamBeginCapture(stream, mode):  # noqa: N802
    if DEVICE.capturing(stream) is not None:
        return (_fail(cudaError_t.cudaErrorInvalidValue),)
    DEVICE.capture_modes.append(cudaStreamCaptureMode(mode))
    DEVICE.captures[int(stream)] = _Capture(cudaStreamCaptureMode(mode), invalid=DEVICE.fail_captures)
    return (cudaError_t.cudaSuccess,)


def cudaStreamEndCapture(stream):  # noqa: N802
    capture = DEVICE.captures.pop(int(stream), None)
    if capture is None:
        return (_fail(cudaError_t.cudaErrorInvalidValue), None)
    if capture.invalid:
        return (_fail(cudaError_t.cudaErrorStreamCaptureInvalidated), None)
    handle = next(DEVICE.handles)
    DEVICE.graphs[handle] = list(capture.ops)
    return (cudaError_t.cudaSuccess, handle)


def cudaGraphInstantiate(graph, flags):  # noqa: N802
    ops = DEVICE.graphs.get(int(graph))
    if ops is None:
        return (_fail(cudaError_t.cudaErrorInvalidResourceHandle), None)
    handle = next(DEVICE.handles)
    DEVICE.execs[handle] = list(ops)
    return (cudaError_t.cudaSuccess, handle)


def cudaGraphLaunch(graphExec, stream):  # noqa: N802, N803
    ops = DEVICE.execs.get(int(graphExec))
    if ops is None:
        return (_fail(cudaError_t.cudaErrorInvalidResourceHandle),)
    for op in ops:
        DEVICE.submit(stream, op)  # replaying a TensorRT enqueue whose context changed raises (fake_tensorrt)
    return (cudaError_t.cudaSuccess,)


def cudaGraphDestroy(graph):  # noqa: N802
    return (cudaError_t.cudaSuccess if DEVICE.graphs.pop(int(graph), None) is not None
            else _fail(cudaError_t.cudaErrorInvalidResourceHandle),)


def cudaGraphExecDestroy(graphExec):  # noqa: N802, N803
    return (cudaError_t.cudaSuccess if DEVICE.execs.pop(int(graphExec), None) is not None
            else _fail(cudaError_t.cudaErrorInvalidResourceHandle),)
