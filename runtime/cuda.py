"""cuda-python helpers shared by the TensorRT backend and the engine builder.

``cuda.bindings.runtime`` (cuda-python >= 12.6; ``cuda.cudart`` before) is imported on first use only, so this
module imports without cuda-python. Calls return ``(err, *values)``; ``cuda_call`` unpacks them and raises
``BackendError`` naming the CUDA error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import BackendError, MissingDependencyError

logger = logging.getLogger(__name__)


def load_cudart() -> Any:
    """The cuda-python runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before cuda-python 12.6).

    Raises:
        MissingDependencyError: cuda-python is not installed.
    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError as err:
            raise MissingDependencyError(
                f"cuda-python is required for the TensorRT backend but cannot be imported ({err}).",
                "pip install 'uniref-deploy[gpu]'",
            ) from err
    return cudart


def error_name(err: Any) -> str:
    """The CUDA error's name (``cudaErrorInvalidValue``)."""
    name = load_cudart().cudaGetErrorName(err)[1]
    return name.decode() if isinstance(name, bytes) else str(name)


def cuda_call(result: Any) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result; raise ``BackendError`` naming the CUDA error."""
    cudart = load_cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA call failed: {error_name(err)}.")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def clear_cuda_error() -> str | None:
    """Reset the runtime's last-error state (``cudaGetLastError``); the name of the cleared error, if any."""
    cudart = load_cudart()
    err = cudart.cudaGetLastError()
    err = err[0] if isinstance(err, tuple) else err
    return None if err == cudart.cudaError_t.cudaSuccess else error_name(err)


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
    props = cuda_call(load_cudart().cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name.rstrip("\x00").strip(), f"{props.major}.{props.minor}")


def device_alloc(nbytes: int) -> int:
    """``cudaMalloc`` of at least one byte; the device pointer as an int."""
    return int(cuda_call(load_cudart().cudaMalloc(max(int(nbytes), 1))))


def device_free(ptr: int) -> None:
    load_cudart().cudaFree(ptr)


class SharedActivation:
    """One device allocation shared by the execution contexts of every stage (they run one after another).

    Each user ``acquire``s it with the bytes it needs and a callback; when a later user needs more, the memory is
    reallocated and every callback is told the new ``(pointer, size)`` so it can rebind its contexts (and drop
    CUDA graphs that captured the old pointer). Freed when the last user releases it.
    """

    def __init__(self) -> None:
        self.ptr: int | None = None
        self.size = 0
        self._users: dict[int, Callable[[int, int], None]] = {}

    def acquire(self, user: object, nbytes: int, on_move: Callable[[int, int], None]) -> tuple[int, int]:
        """Register ``user`` needing ``nbytes``; returns the current ``(pointer, size)``."""
        self._users[id(user)] = on_move
        if self.ptr is None or nbytes > self.size:
            self._grow(max(int(nbytes), self.size, 1), skip=id(user))
        assert self.ptr is not None
        return self.ptr, self.size

    def release(self, user: object) -> None:
        self._users.pop(id(user), None)
        if not self._users and self.ptr is not None:
            device_free(self.ptr)
            self.ptr, self.size = None, 0

    def _grow(self, nbytes: int, skip: int) -> None:
        if self.ptr is not None:
            device_free(self.ptr)
            logger.info("shared activation memory grows from %d to %d bytes", self.size, nbytes)
        self.ptr, self.size = device_alloc(nbytes), nbytes
        for key, on_move in self._users.items():
            if key != skip:
                on_move(self.ptr, self.size)
