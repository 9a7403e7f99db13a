"""``QuantizeWeightsFP8``: store MatMul/Gemm weights as float8 E4M3 with a DequantizeLinear in front."""

from __future__ import annotations

from collections.abc import Iterable

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from uniref_deploy.export.graph_pass import GraphPass, NameGen, initializer_map, node_map, weight_axis
from uniref_deploy.runtime.precision import E4M3_MAX


def fp8_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(float8 E4M3 weight, float32 scale): scale = absmax / E4M3_MAX, per tensor (``axis=None``) or per ``axis``."""
    amax = np.abs(w).max() if axis is None else np.abs(w).max(axis=1 - axis)  # 2-D: reduce the other axis
    scale = np.maximum(np.asarray(amax, np.float32) / E4M3_MAX, np.finfo(np.float32).tiny).astype(np.float32)
    shape = scale if axis is None else np.expand_dims(scale, 1 - axis)
    q = np.clip(w / shape, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


class QuantizeWeightsFP8(GraphPass):
    """Replace the fp32 (or fp16) weight initializer of each named MatMul/Gemm with float8 E4M3 +
    DequantizeLinear; the scale keeps the weight's type, so an fp16 graph stays fp16 around the GEMM.

    Before::

        W (fp32 initializer) ──► MatMul/Gemm

    After::

        W_fp8 (float8e4m3fn) ─┐
        W_scale (fp32)  ──────┴► DequantizeLinear(axis) ──► MatMul/Gemm

    Args:
        nodes: names of the MatMul/Gemm nodes whose input 1 is a 2-D fp32 initializer.
        per_channel: one scale per output channel (``axis``) instead of one per tensor.

    A weight shared by several nodes is quantised once. Returns the number of weights quantised.
    """

    name = "fp8_weights"

    def __init__(self, nodes: Iterable[str], per_channel: bool = True):
        self.nodes = tuple(nodes)
        self.per_channel = per_channel
        self.scales: dict[str, np.ndarray] = {}

    def apply(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        by_name, inits = node_map(graph), initializer_map(graph)
        targets = [by_name[n] for n in self.nodes if n in by_name]
        targets = [n for n in targets if len(n.input) > 1 and n.input[1] in inits
                   and inits[n.input[1]].data_type in FLOAT_TYPES and len(inits[n.input[1]].dims) == 2]
        if not targets:
            return 0
        names = NameGen(graph)
        done: dict[str, str] = {}
        new_nodes: list[onnx.NodeProto] = []
        for node in targets:
            w_name = node.input[1]
            if w_name not in done:
                axis = weight_axis(node) if self.per_channel else None
                w = numpy_helper.to_array(inits[w_name])
                q, scale = fp8_weight(w.astype(np.float32), axis)
                scale = scale.astype(w.dtype)  # DequantizeLinear yields the scale's type: keep the graph's
                q_name, s_name, out = names(f"{w_name}_fp8"), names(f"{w_name}_scale"), names(f"{w_name}_dq")
                graph.initializer.remove(inits[w_name])
                graph.initializer.extend([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)])
                kwargs = {} if axis is None else {"axis": axis}
                new_nodes.append(onnx.helper.make_node("DequantizeLinear", [q_name, s_name], [out],
                                                       name=names(f"{w_name}_DequantizeLinear"), **kwargs))
                done[w_name] = out
                self.scales[w_name] = scale
            node.input[1] = done[w_name]
        _prepend(graph, new_nodes)
        return len(done)


def _prepend(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Put constant-fed nodes first so the node list stays topologically sorted."""
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)
