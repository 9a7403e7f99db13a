"""Activation ranges: per-tensor absmax over the calibration set, read from the fp32 graph in ONNX Runtime."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx

from uniref_deploy.runtime._lazy import require
from uniref_deploy.runtime.errors import CalibrationError

logger = logging.getLogger(__name__)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every typed tensor (inputs, outputs, initializers, inferred intermediates)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]
             if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def with_extra_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns ``tensors`` (at their inferred type, else float; graph inputs are
    skipped)."""
    probe = copy.deepcopy(model)
    have = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input}
    types = tensor_types(model)
    for name in dict.fromkeys(tensors):
        if name not in have:
            elem = types.get(name, onnx.TensorProto.FLOAT)
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return probe


def session(model: onnx.ModelProto | bytes | str, threads: int | None = None):
    """A CPU ONNX Runtime session (basic optimisations, so probed tensors survive)."""
    ort = require("onnxruntime", extra="onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise CalibrationError(f"ONNX Runtime cannot load the graph: {err}".splitlines()[0]) from err


def collect_absmax(model: onnx.ModelProto, tensors: Sequence[str], feeds: Iterable[dict[str, np.ndarray]],
                   progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Max |x| of each tensor over all feeds.

    Args:
        model: the fp32 graph.
        tensors: tensor names to observe (activations of the layers to quantise).
        feeds: one feed dict per calibration sample.
        progress: called with the sample index after each run.

    Raises:
        CalibrationError: a tensor never appeared or held non-finite values.
    """
    names = list(dict.fromkeys(tensors))
    inputs = {i.name for i in model.graph.input}
    sess = session(with_extra_outputs(model, [n for n in names if n not in inputs]))
    out_names = [n for n in names if n not in inputs]
    amax = dict.fromkeys(names, 0.0)
    count = 0
    for i, feed in enumerate(feeds):
        values = sess.run(out_names, feed)
        for name, v in zip(out_names, values, strict=True):
            amax[name] = max(amax[name], float(np.abs(v).max()) if v.size else 0.0)
        for name in names:
            if name in inputs:
                amax[name] = max(amax[name], float(np.abs(feed[name]).max()))
        count += 1
        if progress is not None:
            progress(i)
    if count == 0:
        raise CalibrationError("The calibration set is empty.", "pass --samples 1 or more.")
    bad = [n for n, v in amax.items() if not np.isfinite(v)]
    if bad:
        raise CalibrationError(f"Non-finite activations in {len(bad)} tensor(s), first '{bad[0]}'.",
                               "the fp32 graph overflows on the calibration data; check the export.")
    return amax


def collect_channel_absmax(model: onnx.ModelProto, tensors: Sequence[str], feeds: Iterable[dict[str, np.ndarray]],
                           progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Max |x| of each tensor per channel (its last axis) over all feeds; ``collect_absmax`` is its max.

    Raises:
        CalibrationError: the set is empty, or a tensor never appeared or held non-finite values.
    """
    names = list(dict.fromkeys(tensors))
    inputs = {i.name for i in model.graph.input}
    out_names = [n for n in names if n not in inputs]
    sess = session(with_extra_outputs(model, out_names))
    amax: dict[str, np.ndarray] = {}
    count = 0
    for i, feed in enumerate(feeds):
        values = dict(zip(out_names, sess.run(out_names, feed), strict=True))
        values.update({n: feed[n] for n in names if n in inputs})
        for name in names:
            v = values[name]
            ch = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0).astype(np.float32)
            amax[name] = np.maximum(amax[name], ch) if name in amax else ch
        count += 1
        if progress is not None:
            progress(i)
    if count == 0:
        raise CalibrationError("The calibration set is empty.", "pass --samples 1 or more.")
    bad = [n for n, v in amax.items() if not np.all(np.isfinite(v))]
    if bad:
        raise CalibrationError(f"Non-finite activations in {len(bad)} tensor(s), first '{bad[0]}'.",
                               "the fp32 graph overflows on the calibration data; check the export.")
    return amax
