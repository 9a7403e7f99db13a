"""The backend interface: activate/deactivate and ``infer(feeds) -> outputs``.

The base class validates feeds against the graph's ``TensorSpec``s once, so every backend rejects bad feeds the
same way; subclasses implement ``_activate``, ``_deactivate`` and ``_infer_impl`` only.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from ..errors import BackendError, InputError
from ..manifest import TensorSpec

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


class Backend(ABC):
    """One graph on one execution provider.

    Args:
        name: graph name ("dit", "vae_encoder", "vae_decoder").
        inputs: the graph's input specs (names, dtypes, dynamic axes).
        outputs: the graph's output specs.
    """

    kind = "base"

    def __init__(self, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]):
        self.name = name
        self.inputs = inputs
        self.outputs = outputs
        self.is_active = False

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def activate(self) -> Backend:
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> Backend:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # ---- inference ---------------------------------------------------------------------------------------
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph. Feeds are checked against the input specs first."""
        self.check_feeds(feeds)
        if not self.is_active:
            self.activate()
        return self._infer_impl({s.name: feeds[s.name] for s in self.inputs})

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        expected = {s.name for s in self.inputs}
        missing = expected - set(feeds)
        extra = set(feeds) - expected
        if missing or extra:
            raise InputError(
                f"Graph '{self.name}' got feeds {sorted(feeds)}; missing {sorted(missing)}, unexpected {sorted(extra)}.",
                f"the graph's inputs are {[s.name for s in self.inputs]}.",
            )
        axes: dict[str, int] = {}
        for spec in self.inputs:
            arr = feeds[spec.name]
            want = _NUMPY_DTYPES.get(spec.dtype)
            if want is not None and arr.dtype != want:
                raise InputError(f"Feed '{spec.name}' of graph '{self.name}' is {arr.dtype}, expected {spec.dtype}.")
            if arr.ndim != len(spec.shape):
                raise InputError(
                    f"Feed '{spec.name}' of graph '{self.name}' has shape {arr.shape}, expected rank {len(spec.shape)} "
                    f"{spec.shape}."
                )
            for dim, size in zip(spec.shape, arr.shape, strict=True):
                if isinstance(dim, int) and dim != size:
                    raise InputError(f"Feed '{spec.name}' has shape {arr.shape}, expected {spec.shape}.")
                if isinstance(dim, str) and axes.setdefault(dim, size) != size:
                    raise InputError(
                        f"Feed '{spec.name}' gives axis '{dim}' size {size}, but another input gave {axes[dim]}."
                    )

    # ---- to implement ------------------------------------------------------------------------------------
    def _activate(self) -> None:  # noqa: B027 - optional hook
        pass

    def _deactivate(self) -> None:  # noqa: B027 - optional hook
        pass

    @abstractmethod
    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on validated feeds; return every output by name."""


# name -> "module:attribute"; imported only when that backend is asked for
BACKENDS = {
    "torch": "uniref_deploy.runtime.backends.torch_ref:TorchBackendFactory",
    "ort": "uniref_deploy.runtime.backends.ort:OrtBackendFactory",
    "trt": "uniref_deploy.runtime.backends.trt:TrtBackendFactory",
    "openvino": "uniref_deploy.runtime.backends.openvino:OpenVinoBackendFactory",
}


def backend_factory(kind: str):
    """Return the factory class of backend ``kind`` (imported lazily)."""
    if kind not in BACKENDS:
        raise BackendError(f"Unknown backend '{kind}'.", f"choose one of {', '.join(BACKENDS)}.")
    module, attr = BACKENDS[kind].split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as err:
        raise BackendError(f"Backend '{kind}' is not available in this build ({err}).") from err
