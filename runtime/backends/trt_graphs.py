"""CUDA graphs for TensorRT: one execution context per captured (profile, input shapes) key.

A captured graph replays the exact kernels, shapes and addresses of one enqueue. Replaying it after its context
ran other shapes is undefined (the context's shape-dependent state changed), so every key gets its own context,
which only ever runs that key's shapes; all contexts share the activation buffer and the I/O buffers. A key's
first call enqueues once (warm-up: TensorRT does shape-dependent setup outside the capture), then captures one
enqueue in thread-local mode. A capture that fails clears the CUDA error state and the key falls back to plain
enqueues, with the reason logged once. Captured graphs are kept in an LRU of bounded size.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..cuda import clear_cuda_error, cuda_call, error_name, load_cudart
from ..errors import BackendError

logger = logging.getLogger(__name__)

MAX_CUDA_GRAPHS = 16  # captured graphs kept per backend


@dataclass
class CapturedGraph:
    """A key's context and its instantiated graph (None when capture failed: run the context plainly)."""

    context: Any
    graph_exec: Any | None
    reason: str = ""


class GraphCache:
    """An LRU of ``CapturedGraph`` per key.

    Args:
        name: the graph name, for messages.
        make_context: key -> a context bound to the key's profile, memory and addresses, shapes set.
        max_graphs: entries kept; the least recently used is destroyed beyond it.
    """

    def __init__(self, name: str, make_context: Callable[[tuple], Any], max_graphs: int = MAX_CUDA_GRAPHS):
        self.name, self.make_context, self.max_graphs = name, make_context, max_graphs
        self._entries: OrderedDict[tuple, CapturedGraph] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def captured(self) -> int:
        """How many entries hold a replayable graph."""
        return sum(e.graph_exec is not None for e in self._entries.values())

    def run(self, key: tuple, stream: int) -> Any:
        """Run ``key`` on ``stream``: replay its graph, or (first sight) warm up and capture. Returns the context
        that holds the key's shapes (for output shapes)."""
        cudart = load_cudart()
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            if entry.graph_exec is not None:
                cuda_call(cudart.cudaGraphLaunch(entry.graph_exec, stream))
            else:
                _enqueue(entry.context, stream, self.name)
            return entry.context
        context = self.make_context(key)
        _enqueue(context, stream, self.name)  # warm-up; also this call's result
        entry = _capture(context, stream)
        if entry.graph_exec is None:
            logger.warning("CUDA graph capture failed for %s %s (%s); running it without a graph", self.name,
                           key, entry.reason)
        self._entries[key] = entry
        while len(self._entries) > self.max_graphs:
            _, oldest = self._entries.popitem(last=False)
            _destroy(oldest)
        return context

    def clear(self) -> None:
        """Destroy every graph and drop every context (e.g. the activation buffer moved)."""
        for entry in self._entries.values():
            _destroy(entry)
        self._entries.clear()


def _enqueue(context: Any, stream: int, name: str) -> None:
    if not context.execute_async_v3(stream):
        raise BackendError(f"TensorRT failed to run '{name}'.", "run with -vv for TensorRT's log.")


def _capture(context: Any, stream: int) -> CapturedGraph:
    cudart = load_cudart()
    mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    err = cudart.cudaStreamBeginCapture(stream, mode)
    err = err[0] if isinstance(err, tuple) else err
    if err != cudart.cudaError_t.cudaSuccess:
        clear_cuda_error()
        return CapturedGraph(context, None, f"cudaStreamBeginCapture: {error_name(err)}")
    ok = context.execute_async_v3(stream)
    err, graph = cudart.cudaStreamEndCapture(stream)
    if not ok or err != cudart.cudaError_t.cudaSuccess or graph is None:
        if graph is not None:
            cudart.cudaGraphDestroy(graph)
        cleared = clear_cuda_error()
        reason = "enqueue failed during capture" if not ok else f"cudaStreamEndCapture: {error_name(err)}"
        return CapturedGraph(context, None, reason + (f"; cleared {cleared}" if cleared else ""))
    err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
    cudart.cudaGraphDestroy(graph)
    if err != cudart.cudaError_t.cudaSuccess:
        clear_cuda_error()
        return CapturedGraph(context, None, f"cudaGraphInstantiate: {error_name(err)}")
    return CapturedGraph(context, graph_exec)


def _destroy(entry: CapturedGraph) -> None:
    if entry.graph_exec is not None:
        load_cudart().cudaGraphExecDestroy(entry.graph_exec)
    entry.graph_exec = entry.context = None
