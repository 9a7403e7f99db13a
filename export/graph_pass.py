"""``GraphPass``: the base of every ONNX graph edit (the ORT fusions of ``export/ort_fusions.py`` and the FP8 passes
of ``calibration/passes``), plus the graph queries the passes share."""

from __future__ import annotations

import logging
import time

import onnx

logger = logging.getLogger(__name__)


class GraphPass:
    """One named edit of an ONNX model, in place; subclasses implement ``apply`` and return a count of edits.

    A pass that finds nothing to do returns 0 without touching the model.
    """

    name = "pass"

    def __call__(self, model: onnx.ModelProto) -> int:
        start = time.perf_counter()
        count = self.apply(model)
        logger.info("%s: %d edit(s) in %.2f s", self.name, count, time.perf_counter() - start)
        return count

    def apply(self, model: onnx.ModelProto) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


# ---- graph queries ----------------------------------------------------------------------------------------------


def initializer_map(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers by name."""
    return {t.name: t for t in graph.initializer}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def node_map(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Nodes by name (the exporter names every node uniquely)."""
    return {n.name: n for n in graph.node}


def attribute(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    """An integer attribute of ``node`` or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return int(onnx.helper.get_attribute_value(a))
    return default


def weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a 2-D weight fed as input 1 of MatMul ([in, out]) or Gemm ([out, in] if transB)."""
    if node.op_type == "Gemm":
        return 0 if attribute(node, "transB") else 1
    return 1


class NameGen:
    """Fresh tensor/node names that collide with nothing already in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = {t.name for t in graph.initializer} | {n.name for n in graph.node}
        self.used |= {o for n in graph.node for o in n.output} | {i.name for i in graph.input}

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name
