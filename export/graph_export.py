"""torch module -> ONNX file with named dynamic axes, checked, written atomically.

Uses the torch.export-based exporter (``dynamo=True``): it passes validation on these graphs, keeps dynamic
dimensions symbolic (no sequence length baked in), and emits plain ONNX ops that TensorRT's parser takes.
Example inputs must use sizes >= 2 on dynamic axes (torch.export specialises size-1 dims).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch

from uniref_deploy.runtime.errors import ExportError
from uniref_deploy.runtime.fileio import make_temp_dir
from uniref_deploy.runtime.manifest import TensorSpec

from .onnx_files import EXTERNAL_DATA_THRESHOLD, move_into_place

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
# Ranges of each named dynamic axis given to torch.export (min, max); multiples are expressed via `AXIS_MULTIPLE`.
AXIS_RANGES = {
    "batch": (1, 2),
    "img_tokens": (2, 65536),
    "txt_tokens": (1, 1024),
    "height": (2, 2048),  # in units of AXIS_MULTIPLE
    "width": (2, 2048),
    "latent_height": (2, 2048),
    "latent_width": (2, 2048),
    "merged": (1, 16384),  # text_vision: merged image tokens; its patches axis is 4x this (AXIS_DERIVED)
    "text_len": (1, 16384),  # text_encoder: the templated prompt's tokens
}
AXIS_MULTIPLE = {"height": 8, "width": 8}
AXIS_DERIVED = {"patches": ("merged", 4)}  # an axis that is a fixed multiple of another named axis


def dynamic_shapes_for(specs: Sequence[TensorSpec]) -> dict[str, dict[int, object]]:
    """torch.export dynamic-shape spec from TensorSpecs; equal axis names share one symbol."""
    dims: dict[str, object] = {}
    out: dict[str, dict[int, object]] = {}
    for spec in specs:
        axes = {}
        for i, name in spec.dynamic_axes.items():
            if name in AXIS_DERIVED:
                base, factor = AXIS_DERIVED[name]
                if base not in dims:
                    lo, hi = AXIS_RANGES[base]
                    dims[base] = torch.export.Dim(base, min=lo, max=hi)
                dims[name] = dims[base] * factor
            if name not in dims:
                lo, hi = AXIS_RANGES[name]
                dim = torch.export.Dim(name.replace("-", "_"), min=lo, max=hi)
                dims[name] = dim * AXIS_MULTIPLE[name] if name in AXIS_MULTIPLE else dim
            axes[i] = dims[name]
        out[spec.name] = axes
    return out


def export_graph(module: torch.nn.Module, args: tuple, path: str | os.PathLike, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], opset: int = DEFAULT_OPSET) -> Path:
    """Export ``module`` called with ``args`` to ``path`` (+ ``path.data`` when over 2 GB).

    Raises:
        ExportError: torch.export or the ONNX checker failed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = make_temp_dir(path)
    try:
        tmp = tmp_dir / path.name
        names = [s.name for s in inputs]
        try:
            program = torch.onnx.export(
                module, args, None, input_names=names, output_names=[s.name for s in outputs],
                dynamic_shapes=_by_position(module, names, dynamic_shapes_for(inputs)), opset_version=opset,
                dynamo=True, optimize=True, verbose=False,
            )
        except Exception as err:
            raise ExportError(f"torch.onnx.export failed for '{path.name}': {_summary(err)}",
                              "run with -vv for the full trace.") from err
        large = _param_bytes(module) > EXTERNAL_DATA_THRESHOLD * 0.9
        program.save(str(tmp), external_data=large)
        model = onnx.load(str(tmp), load_external_data=False)  # the graph only; weights stay where they are
        name_dynamic_axes(model, [*inputs, *outputs])
        onnx.save_model(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as err:
            raise ExportError(f"ONNX checker rejected '{path.name}': {str(err).splitlines()[0]}") from err
        move_into_place(tmp_dir, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("exported %s", path)
    return path


def _by_position(module: torch.nn.Module, names: list[str], shapes: dict) -> tuple:
    """dynamic_shapes in argument order (independent of forward's parameter names); nested for ``*args``."""
    import inspect

    ordered = tuple(shapes.get(n) or None for n in names)
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return (ordered,)
    return ordered


def _summary(err: Exception) -> str:
    """The most informative single line of an exporter error."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("<class") or "Error:" in ln:
            return ln
    return lines[0] if lines else type(err).__name__


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def name_dynamic_axes(model: onnx.ModelProto, specs: Sequence[TensorSpec]) -> None:
    """Rename the exporter's symbolic dims (e.g. '8*s0') on graph inputs/outputs to our axis names.

    Raises:
        ExportError: an axis meant to be dynamic came out of the trace as a number (the model pinned it, e.g. by
            splitting the batch in half); renaming it would hide that the graph only runs at that size.
    """
    check_dynamic_axes(model, specs)
    by_name = {s.name: s for s in specs}
    for value in [*model.graph.input, *model.graph.output]:
        spec = by_name.get(value.name)
        if spec is None:
            continue
        for dim, want in zip(value.type.tensor_type.shape.dim, spec.shape, strict=False):
            if isinstance(want, str):
                dim.ClearField("dim_value")
                dim.dim_param = want


def check_dynamic_axes(model: onnx.ModelProto, specs: Sequence[TensorSpec]) -> None:
    """Every axis named dynamic in ``specs`` must be symbolic on the traced graph's inputs and outputs.

    Raises:
        ExportError: naming the first input/output and axis that the trace fixed to a concrete size.
    """
    by_name = {s.name: s for s in specs}
    for value in [*model.graph.input, *model.graph.output]:
        spec = by_name.get(value.name)
        if spec is None:
            continue
        for axis, (dim, want) in enumerate(zip(value.type.tensor_type.shape.dim, spec.shape, strict=False)):
            if isinstance(want, str) and dim.HasField("dim_value"):
                raise ExportError(
                    f"The traced graph fixed dynamic axis {axis} ('{want}') of '{value.name}' to {dim.dim_value}; "
                    f"it would only run at that size.",
                    "the model code specialises on this dimension (e.g. splits or reshapes it by a constant); "
                    "run with -vv and look for guards on it.",
                )
