"""Refit a refittable TensorRT engine with the new weights of its ONNX graph (after ``uniref-deploy lora``).

An engine built with ``build --refittable`` (``BuilderFlag.REFIT`` on a strongly typed network) names its
refittable weights after the ONNX initializers. ``refit_engine``:

    1. deserialises the plan and opens a ``trt.Refitter`` on it;
    2. ``set_named_weights`` for each changed initializer, then for whatever ``get_missing_weights`` still asks
       for (weights TensorRT combined with a changed one), all read from the graph file as it is now (external
       data through a read-only memory map: no copy of the model in memory);
    3. ``refit_cuda_engine``, ``serialize``, writes the plan atomically and returns its record with the new
       sha256, the graph's new sha256 and the matching plan-settings hash (so ``build`` reuses it).

TensorRT and a GPU are needed; without them, or when TensorRT refuses, the caller marks the engine stale.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from uniref_deploy.runtime._lazy import require
from uniref_deploy.runtime.errors import EngineBuildError
from uniref_deploy.runtime.fileio import atomic_path, sha256_file
from uniref_deploy.runtime.manifest import EngineSpec

from .records import BuildPlan, EnginePlan, ProfilePlan

ONNX_NP = {1: np.float32, 10: np.float16, 16: np.uint16}  # FLOAT, FLOAT16, BFLOAT16 (as its raw 16 bits)
ONNX_TRT = {1: "FLOAT", 10: "HALF", 16: "BF16"}


def read_initializers(onnx_path: Path, names: Iterable[str]) -> dict[str, tuple[np.ndarray, int]]:
    """{name: (array, ONNX dtype)} of the named float initializers; external data is memory-mapped, not loaded.

    Raises:
        EngineBuildError: a name is not a float initializer of the graph.
    """
    import onnx
    from onnx import numpy_helper

    wanted = set(names)
    out: dict[str, tuple[np.ndarray, int]] = {}
    for t in onnx.load(str(onnx_path), load_external_data=False).graph.initializer:
        if t.name not in wanted:
            continue
        if t.data_type not in ONNX_NP:
            raise EngineBuildError(f"Initializer '{t.name}' of {onnx_path.name} has ONNX type {t.data_type}; only "
                                   "float weights are refitted.", "rebuild the engine with `uniref-deploy build`.")
        if t.data_location == onnx.TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in t.external_data}
            count = int(np.prod(t.dims)) if t.dims else 1
            arr = np.memmap(onnx_path.parent / ext["location"], dtype=ONNX_NP[t.data_type], mode="r",
                            offset=int(ext.get("offset", 0)), shape=(count,))
        else:
            arr = numpy_helper.to_array(t).reshape(-1)
            arr = arr.view(np.uint16) if t.data_type == 16 else arr
        out[t.name] = (np.ascontiguousarray(arr).reshape(tuple(t.dims)), t.data_type)
    missing = sorted(wanted - set(out))
    if missing:
        raise EngineBuildError(f"{onnx_path.name} has no float initializer(s) {missing[:3]} that the engine refits.",
                               "rebuild the engine with `uniref-deploy build`.")
    return out


def refit_engine(art: Path, spec: EngineSpec, onnx_file: str, onnx_sha256: str, changed: Iterable[str]) -> EngineSpec:
    """Refit ``spec``'s plan with the ``changed`` initializers of ``art/onnx_file``; the updated record.

    Raises:
        MissingDependencyError: TensorRT is not installed.
        EngineBuildError: the plan does not deserialise, is not refittable, or TensorRT refuses the weights.
    """
    trt = require("tensorrt", extra="gpu")
    start, changed = time.perf_counter(), list(changed)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(trt_logger).deserialize_cuda_engine((art / spec.file).read_bytes())
    if engine is None:
        raise EngineBuildError(f"TensorRT cannot load {spec.file} (built by another version or GPU?).",
                               "rebuild it with `uniref-deploy build`.")
    if not engine.refittable:
        raise EngineBuildError(f"{spec.file} was not built refittable.", "rebuild it with `uniref-deploy build --refittable`.")
    refitter = trt.Refitter(engine, trt_logger)
    graph = art / onnx_file
    keep: list[Any] = []  # the arrays must outlive refit_cuda_engine
    _set(trt, refitter, read_initializers(graph, changed), keep, spec.file)
    missing = [str(n) for n in refitter.get_missing_weights()]
    if missing:
        _set(trt, refitter, read_initializers(graph, missing), keep, spec.file)
    if not refitter.refit_cuda_engine():
        raise EngineBuildError(f"TensorRT refused to refit {spec.file} (still missing: "
                               f"{[str(n) for n in refitter.get_missing_weights()][:3]}).",
                               "rebuild it with `uniref-deploy build`.")
    serialized = engine.serialize()
    with atomic_path(art / spec.file) as tmp:
        tmp.write_bytes(memoryview(serialized).cast("B"))
    del keep
    p = dict(spec.provenance)
    plan = refitted_plan(spec, onnx_file, onnx_sha256)
    p.update(onnx_sha256=onnx_sha256, plan_sha256=plan.settings_sha256(), engine_bytes=(art / spec.file).stat().st_size,
             refit={"seconds": round(time.perf_counter() - start, 3), "weights": len(set(changed) | set(missing))})
    return dataclasses.replace(spec, sha256=sha256_file(art / spec.file), provenance=p)


def _set(trt: Any, refitter: Any, weights: dict[str, tuple[np.ndarray, int]], keep: list, file: str) -> None:
    for name, (arr, dtype) in weights.items():
        w = (trt.Weights(getattr(trt.DataType, ONNX_TRT[dtype]), arr.ctypes.data, arr.size) if dtype == 16
             else trt.Weights(arr))
        keep.append((arr, w))
        if not refitter.set_named_weights(name, w):
            raise EngineBuildError(f"TensorRT does not accept new weights '{name}' for {file} (not refittable, or "
                                   "another size or type).", "rebuild it with `uniref-deploy build`.")


def refitted_plan(spec: EngineSpec, onnx_file: str, onnx_sha256: str) -> EnginePlan:
    """The ``EnginePlan`` the engine now corresponds to (its settings with the graph's new sha256)."""
    p = spec.provenance
    return EnginePlan(spec.graph, spec.precision, onnx_file, onnx_sha256, spec.file,
                      tuple(ProfilePlan.from_dict(d) for d in p["profiles"]),
                      builder_optimization_level=int(p["builder_optimization_level"]),
                      strongly_typed=bool(p["strongly_typed"]), refittable=bool(p["refittable"]),
                      weight_streaming_budget=p.get("weight_streaming_budget"))


def update_saved_plan(art: Path, refitted: Iterable[EngineSpec]) -> None:
    """Point the refitted engines' entries of ``engines/plan.json`` (when present) at their graphs' new sha256."""
    from .plan import save_plan
    from .records import PLAN_FILE

    path = art / PLAN_FILE
    if not path.is_file():
        return
    plan = BuildPlan.from_json(path.read_text())
    new = {e.file: e.provenance["onnx_sha256"] for e in refitted}
    engines = tuple(dataclasses.replace(e, onnx_sha256=new[e.engine_file]) if e.engine_file in new else e
                    for e in plan.engines)
    save_plan(dataclasses.replace(plan, engines=engines), art)
