"""Loading one TensorRT plan and making execution contexts for it.

A plan file is read once: its sha256 is taken from the bytes in memory (not a second read) and the same bytes
are deserialised. ``EngineProfiles`` reads every optimization profile back from the engine
(``get_tensor_profile_shape``), so the runtime trusts the plan, not the manifest, for what each profile holds.
Contexts are created with user-managed device memory (``ExecutionContextAllocationStrategy.USER_MANAGED``):
the caller binds the shared activation buffer.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, ManifestError
from ..manifest import EngineSpec

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


@dataclass
class LoadedEngine:
    """A deserialised engine with its tensors and profiles."""

    spec: EngineSpec
    engine: Any
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dtypes: dict[str, np.dtype]
    profiles: list[ProfileShapes] = field(default_factory=list)

    def holds(self, index: int, shapes: dict[str, Shape]) -> bool:
        """True when profile ``index`` holds every shape in ``shapes``."""
        profile = self.profiles[index]
        for name, shape in shapes.items():
            lo, _, hi = profile[name]
            if len(shape) != len(lo) or any(n < a or n > b for a, n, b in zip(lo, shape, hi, strict=True)):
                return False
        return True

    def device_memory_size(self) -> int:
        """Activation bytes the largest profile needs (``device_memory_size_v2``, after any weight-streaming
        budget was applied)."""
        return int(self.engine.device_memory_size_v2)


def load_engine(trt: Any, runtime: Any, spec: EngineSpec, art_dir: str | os.PathLike, expected: set[str],
                verify: bool = True, weight_streaming_budget: int | None = None) -> LoadedEngine:
    """Read, check and deserialise the plan of ``spec``.

    Args:
        trt: the tensorrt module.
        runtime: a ``trt.Runtime``.
        spec: the manifest's engine entry.
        art_dir: the artifact folder.
        expected: the graph's input and output names.
        verify: compare the file's sha256 with the manifest's.
        weight_streaming_budget: bytes of weights to keep on the GPU (streamable engines only).

    Raises:
        ManifestError: the file is missing or does not match the manifest.
        BackendError: TensorRT cannot deserialise it (another TensorRT version or GPU), or its tensors differ.
    """
    path = Path(art_dir) / spec.file
    if not path.is_file():
        raise ManifestError(f"Engine file '{path}' is missing.", "run `uniref-deploy build` for these artifacts.")
    data = path.read_bytes()
    if verify and hashlib.sha256(data).hexdigest() != spec.sha256:
        raise ManifestError(f"Engine file '{path}' does not match the manifest's sha256 (damaged or replaced).",
                            "re-run `uniref-deploy build`.")
    engine = runtime.deserialize_cuda_engine(data)
    del data
    if engine is None:
        raise BackendError(f"TensorRT could not deserialise '{path}' (built by another TensorRT version or for "
                           "another GPU?).", "rebuild it here with `uniref-deploy build ART --force`.")
    if weight_streaming_budget is not None and engine.streamable_weights_size > 0:
        engine.weight_streaming_budget_v2 = int(weight_streaming_budget)
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    if set(names) != expected:
        raise BackendError(f"Engine '{path}' has tensors {sorted(names)}, expected {sorted(expected)}.",
                           "the engine was built from another graph; re-run `uniref-deploy build`.")
    if engine.num_optimization_profiles != len(spec.budgets):
        raise BackendError(f"Engine '{path}' has {engine.num_optimization_profiles} optimization profile(s), the "
                           f"manifest lists {len(spec.budgets)}.", "re-run `uniref-deploy build --force`.")
    inputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    loaded = LoadedEngine(spec, engine, inputs, tuple(n for n in names if n not in inputs),
                          {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names})
    loaded.profiles = [{n: _profile_shapes(engine, n, i) for n in inputs} for i in range(len(spec.budgets))]
    return loaded


def _profile_shapes(engine: Any, name: str, index: int) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) of input ``name`` in profile ``index``; a static input's own shape three times."""
    static = tuple(engine.get_tensor_shape(name))
    if all(n >= 0 for n in static):
        return (static, static, static)
    lo, opt, hi = engine.get_tensor_profile_shape(name, index)
    return (tuple(lo), tuple(opt), tuple(hi))


def create_context(trt: Any, loaded: LoadedEngine, profile: int, stream: int, activation: tuple[int, int],
                   addresses: dict[str, int]) -> Any:
    """An execution context bound to ``profile``, the shared ``activation`` (pointer, size) and I/O ``addresses``.

    Raises:
        BackendError: TensorRT refused the context or the profile.
    """
    context = loaded.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    if context is None:
        raise BackendError(f"TensorRT could not create an execution context for '{loaded.spec.file}'.")
    context.set_device_memory(*activation)
    if not context.set_optimization_profile_async(profile, stream):
        raise BackendError(f"TensorRT refused optimization profile {profile} of '{loaded.spec.file}'.")
    for name, ptr in addresses.items():
        context.set_tensor_address(name, ptr)
    return context


def set_shapes(context: Any, shapes: dict[str, Shape], graph: str) -> None:
    """``set_input_shape`` for every input.

    Raises:
        BackendError: TensorRT rejected a shape (outside the bound profile).
    """
    for name, shape in shapes.items():
        if not context.set_input_shape(name, shape):
            raise BackendError(f"TensorRT rejected shape {shape} for input '{name}' of '{graph}'.")
