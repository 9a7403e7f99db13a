"""``QuantizeActivationsFP8``: fake-quantise activations to float8 E4M3 in front of the chosen matmuls."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from uniref_deploy.export.graph_pass import GraphPass, NameGen, node_map
from uniref_deploy.runtime.precision import E4M3_MAX


class QuantizeActivationsFP8(GraphPass):
    """Insert QuantizeLinear/DequantizeLinear (float8e4m3fn zero point, scale = absmax / E4M3_MAX) on node inputs.

    Before::

        x ──► MatMul            (x also read by other nodes, unchanged)

    After::

        x ──► QuantizeLinear(x_scale, zp: float8e4m3fn) ──► DequantizeLinear ──► MatMul

    One Q/DQ pair per tensor is shared by every targeted consumer (q/k/v projections read the same input).

    Args:
        targets: ``(node name, input index)`` pairs to quantise.
        ranges: calibrated absmax per tensor name; a target whose tensor has no (finite, positive) range is
            skipped.

    Returns the number of Q/DQ pairs inserted.
    """

    name = "fp8_activations"

    def __init__(self, targets: Iterable[tuple[str, int]], ranges: Mapping[str, float],
                 dtypes: Mapping[str, np.dtype] | None = None):
        self.targets = tuple(targets)
        self.ranges = dict(ranges)
        self.dtypes = dict(dtypes or {})  # tensor -> its type (fp16 in the fp16 graph); float32 when absent

    def apply(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        by_name = node_map(graph)
        todo = [(by_name[n], i) for n, i in self.targets if n in by_name and i < len(by_name[n].input)]
        todo = [(n, i) for n, i in todo if _usable(self.ranges.get(n.input[i]))]
        if not todo:
            return 0
        names = NameGen(graph)
        made: dict[str, str] = {}
        inserted: dict[str, list[onnx.NodeProto]] = {}  # consumer name -> Q/DQ nodes to place before it
        for node, idx in todo:
            tensor = node.input[idx]
            if tensor not in made:
                scale = np.float32(self.ranges[tensor] / E4M3_MAX)
                s_name, z_name = names(f"{tensor}_act_scale"), names(f"{tensor}_act_zp")
                q_out, dq_out = names(f"{tensor}_q"), names(f"{tensor}_dq")
                graph.initializer.extend([
                    numpy_helper.from_array(np.asarray(scale, self.dtypes.get(tensor, np.float32)), s_name),
                    onnx.helper.make_tensor(z_name, onnx.TensorProto.FLOAT8E4M3FN, [], [0]),
                ])
                inserted.setdefault(node.name, []).extend([
                    onnx.helper.make_node("QuantizeLinear", [tensor, s_name, z_name], [q_out],
                                          name=names(f"{tensor}_QuantizeLinear"), saturate=1),
                    onnx.helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                                          name=names(f"{tensor}_DequantizeLinear")),
                ])
                made[tensor] = dq_out
            node.input[idx] = made[tensor]
        _insert_before(graph, inserted)
        return len(made)


def _usable(amax: float | None) -> bool:
    return amax is not None and bool(np.isfinite(amax)) and amax > 0


def _insert_before(graph: onnx.GraphProto, inserted: dict[str, list[onnx.NodeProto]]) -> None:
    """Place each new Q/DQ pair right before its first consumer (keeps the list topologically sorted)."""
    old = list(graph.node)
    del graph.node[:]
    for node in old:
        graph.node.extend(inserted.get(node.name, []))
        graph.node.append(node)
