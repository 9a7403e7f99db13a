"""``QuantizeActivationsInt8``: static per-tensor int8 Q/DQ on matmul inputs, with an optional SmoothQuant Mul."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from uniref_deploy.export.graph_pass import GraphPass, NameGen, node_map
from uniref_deploy.runtime.precision import INT8_MAX


class QuantizeActivationsInt8(GraphPass):
    """Insert an int8 QuantizeLinear/DequantizeLinear pair (zero point 0, scale = absmax / 127) on node inputs;
    where SmoothQuant factors ``s`` are given for the tensor, divide it by ``s`` first (an explicit Mul by 1/s,
    whose inverse ``QuantizeWeightsInt8`` folded into the weights).

    Before::

        x ──► MatMul

    After::

        x ──► [Mul(1/s)] ──► QuantizeLinear(scale, zp: int8 0) ──► DequantizeLinear ──► MatMul

    The Mul is shared by every targeted consumer of a tensor (q/k/v read the same input); each consumer gets
    its own Q/DQ pair (same scale). ONNX Runtime turns each
    DQ -> MatMul <- DQ into ``MatMulIntegerToFloat``, OpenVINO into an int8 FullyConnected, TensorRT into an
    INT8 GEMM.

    Args:
        targets: ``(node name, input index)`` pairs.
        amax: absmax per tensor name, *after* smoothing; a tensor without a positive finite one is skipped.
        smooth: tensor -> SmoothQuant factors ``s`` (length = the tensor's last axis).

    Returns the number of Q/DQ pairs inserted (one per target).
    """

    name = "int8_activations"

    def __init__(self, targets: Iterable[tuple[str, int]], amax: Mapping[str, float],
                 smooth: Mapping[str, np.ndarray] | None = None):
        self.targets = tuple(targets)
        self.amax = dict(amax)
        self.smooth = dict(smooth or {})

    def apply(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        by_name = node_map(graph)
        todo = [(by_name[n], i) for n, i in self.targets if n in by_name and i < len(by_name[n].input)]
        todo = [(n, i) for n, i in todo if _usable(self.amax.get(n.input[i]))]
        names = NameGen(graph)
        smoothed: dict[str, str] = {}
        inserted: dict[str, list[onnx.NodeProto]] = {}
        for node, idx in todo:
            tensor = node.input[idx]
            chain: list[onnx.NodeProto] = []
            if tensor in self.smooth and tensor not in smoothed:
                inv = names(f"{tensor}_smooth_inv")
                graph.initializer.append(numpy_helper.from_array((1.0 / self.smooth[tensor]).astype(np.float32), inv))
                smoothed[tensor] = names(f"{tensor}_smoothed")
                chain.append(onnx.helper.make_node("Mul", [tensor, inv], [smoothed[tensor]], name=names(f"{tensor}_Smooth")))
            src = smoothed.get(tensor, tensor)
            # a Q/DQ pair per consumer, each with its own scale initializers: ONNX Runtime's common-subexpression
            # pass would merge identical pairs, and it fuses DQ -> MatMul only where the DQ has one consumer
            s_name, z_name = names(f"{tensor}_act_scale"), names(f"{tensor}_act_zp")
            q_out, dq_out = names(f"{tensor}_q"), names(f"{tensor}_dq")
            graph.initializer.extend([
                numpy_helper.from_array(np.asarray(self.amax[tensor] / INT8_MAX, np.float32), s_name),
                numpy_helper.from_array(np.asarray(0, np.int8), z_name),
            ])
            chain += [
                onnx.helper.make_node("QuantizeLinear", [src, s_name, z_name], [q_out],
                                      name=names(f"{tensor}_QuantizeLinear")),
                onnx.helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                                      name=names(f"{tensor}_DequantizeLinear")),
            ]
            inserted.setdefault(node.name, []).extend(chain)
            node.input[idx] = dq_out
        old = list(graph.node)
        del graph.node[:]
        for node in old:
            graph.node.extend(inserted.get(node.name, []))
            graph.node.append(node)
        return len(todo)


def _usable(amax: float | None) -> bool:
    return amax is not None and bool(np.isfinite(amax)) and amax > 0
