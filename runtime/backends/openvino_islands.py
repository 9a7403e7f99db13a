"""f32 islands: the parts of a graph that OpenVINO's bf16 inference must not touch, split into an f32 pre-model.

With ``INFERENCE_PRECISION_HINT=bf16`` the CPU plugin rounds every intermediate float tensor to bf16. That is the
intended trade for matmuls, but not for a sinusoid of a graph input: the DiT's timestep projection computes
``sin(t * 1000 * freq)``, and rounding the argument (up to ~1000 rad) to bf16's 8 significant bits moves it by
up to 2 rad. diffusers in torch bf16 computes that argument in fp32, so without this split OpenVINO bf16 lost
to torch bf16 on the per-step velocity cosine (issue 16). OpenVINO's own per-node marker
(``DisablePrecisionConversion``) cannot be set from Python and does not survive the plugin's fusions.

The rule (graph-generic, no node names)::

    Parameter(s) --[no MatMul/Conv on the way]--> Sin / Cos  -->  rest of the graph
        becomes
    pre-model (f32):  Parameter(s) --> Sin / Cos --> Result "f32_island.<node>"
    main (bf16):      Parameter "f32_island.<node>" --> rest of the graph

Parameters only the islands used are dropped from the main model. A graph without such Sin/Cos is left as is.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

from .._lazy import require

SENSITIVE_OPS = ("Sin", "Cos")  # periodic in an argument that bf16 cannot hold
STOP_OPS = ("MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData")  # weight compute: not an island
ISLAND_PREFIX = "f32_island."
RULE_VERSION = 1  # part of the precision record's key: a changed rule re-measures


@dataclass
class IslandSplit:
    """A graph split for bf16 inference.

    Attributes:
        main: the model to compile at the requested precision (the input model, edited in place).
        pre: the f32 pre-model computing the islands, or None when the graph has none.
        islands: friendly names of the Sin/Cos nodes moved to ``pre``.
        pre_inputs: names of the graph inputs the pre-model reads.
        main_inputs: names of the main model's inputs (graph inputs and ``f32_island.*`` tensors).
    """

    main: Any
    pre: Any | None
    islands: tuple[str, ...]
    pre_inputs: tuple[str, ...]
    main_inputs: tuple[str, ...]

    def without_models(self) -> IslandSplit:
        """The names only: what a compiled backend keeps (the models hold a copy of every weight)."""
        return dataclasses.replace(self, main=None, pre=None)


def _input_sources(node) -> set[str] | None:
    """Friendly names of the Parameters ``node`` depends on, or None if a STOP_OPS node lies on the way."""
    seen: set[str] = set()
    params: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        key = current.get_name()  # unique per node (Python wrappers are not: no id())
        if key in seen:
            continue
        seen.add(key)
        kind = current.get_type_name()
        if kind == "Parameter":
            params.add(current.get_friendly_name())
        elif kind in STOP_OPS:
            return None
        else:
            stack.extend(inp.get_source_output().get_node() for inp in current.inputs())
    return params


def _islands(model) -> list[tuple[Any, set[str]]]:
    """(Sin/Cos node, Parameters it reads) for each island node of ``model``, in graph order."""
    found = []
    for op in model.get_ordered_ops():
        if op.get_type_name() in SENSITIVE_OPS:
            sources = _input_sources(op)
            if sources:  # graph-input dependent (a constant-only Sin folds away anyway)
                found.append((op, sources))
    return found


def split_f32_islands(model) -> IslandSplit:
    """Split ``model`` (an ``openvino.Model``, edited in place) into an f32 pre-model and the main model."""
    ov = require("openvino", extra="openvino")
    opset = importlib.import_module("openvino.opset13")
    found = _islands(model)
    if not found:
        return unsplit(model)
    # the pre-model is cut from a clone so the main model's nodes stay untouched until rewired below
    clone = model.clone()
    clone_islands = _islands(clone)
    names = tuple(op.get_friendly_name() for op, _ in clone_islands)
    used = set().union(*(sources for _, sources in clone_islands))
    results = []
    for op, _ in clone_islands:
        op.output(0).get_tensor().set_names({ISLAND_PREFIX + op.get_friendly_name()})
        results.append(opset.result(op.output(0)))
    pre = ov.Model(results, [p for p in clone.get_parameters() if p.get_friendly_name() in used], "f32_islands")

    new_params = []
    for op, _ in found:
        out = op.output(0)
        param = opset.parameter(out.get_partial_shape(), out.get_element_type(),
                                name=ISLAND_PREFIX + op.get_friendly_name())
        param.output(0).get_tensor().set_names({ISLAND_PREFIX + op.get_friendly_name()})
        for target in list(out.get_target_inputs()):
            target.replace_source_output(param.output(0))
        new_params.append(param)
    model.add_parameters(new_params)
    # the detached Sin/Cos chain may still be alive (Python holds it): judge by what the results reach
    live = {op.get_name() for op in model.get_ordered_ops() if op.get_type_name() != "Parameter"}
    for param in list(model.get_parameters()):
        if not any(t.get_node().get_name() in live for t in param.output(0).get_target_inputs()):
            model.remove_parameter(param)  # read by the islands only
    model.validate_nodes_and_infer_types()
    return IslandSplit(main=model, pre=pre, islands=names, pre_inputs=_names(pre), main_inputs=_names(model))


def unsplit(model) -> IslandSplit:
    """``model`` whole, as a split without islands (also what a comparison without the split uses)."""
    return IslandSplit(main=model, pre=None, islands=(), pre_inputs=(), main_inputs=_names(model))


def _names(model) -> tuple[str, ...]:
    return tuple(p.get_friendly_name() for p in model.get_parameters())
