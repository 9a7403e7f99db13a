"""``GemmToMatMul``: rewrite chosen Gemm layers as MatMul (+ Add) so every quantised layer has one form."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from uniref_deploy.export.graph_pass import GraphPass, NameGen, attribute, initializer_map, node_map


class GemmToMatMul(GraphPass):
    """Turn ``Gemm(x, W, b)`` (alpha = beta = 1, no transA, ``W`` a 2-D initializer) into ``MatMul`` + ``Add``.

    Before::

        x ──► Gemm(W [out, in], b, transB=1) ──► y

    After::

        x [B, in] ──► Unsqueeze(0) ──► MatMul(Wᵀ [in, out]) ──► Squeeze(0) ──► Add(b) ──► y

    The MatMul keeps the Gemm's node name, so layer lists made before the pass stay valid. ONNX Runtime's
    quantised-matmul fusions (MatMulIntegerToFloat, MatMulNBits) and TensorRT's Q/DQ placement all take this
    form; the MatMul runs on a 3-D view because ONNX Runtime would fuse a 2-D MatMul + Add back into a Gemm,
    which has no integer form for float outputs. Returns the number of nodes rewritten.
    """

    name = "gemm_to_matmul"

    def __init__(self, nodes: Iterable[str]):
        self.nodes = tuple(nodes)

    def apply(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        by_name, inits = node_map(graph), initializer_map(graph)
        names = NameGen(graph)
        count = 0
        for node_name in self.nodes:
            node = by_name.get(node_name)
            if node is None or node.op_type != "Gemm" or not _plain(node) or node.input[1] not in inits:
                continue
            w_init = inits[node.input[1]]
            w = numpy_helper.to_array(w_init)
            if attribute(node, "transB"):
                w_name = names(f"{w_init.name}_t")
                graph.initializer.append(numpy_helper.from_array(w.T.copy(), w_name))
                if not _read_elsewhere(graph, w_init.name, node):
                    graph.initializer.remove(w_init)
            else:
                w_name = w_init.name
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            out = node.output[0]
            axes, x3, mm3 = names(f"{node.name}_axis0"), names(f"{out}_in3d"), names(f"{out}_mm3d")
            mm_out = names(f"{out}_matmul") if bias else out
            graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axes))
            matmul = onnx.helper.make_node("MatMul", [x3, w_name], [mm3], name=node.name)
            matmul.metadata_props.extend(node.metadata_props)
            new = [onnx.helper.make_node("Unsqueeze", [node.input[0], axes], [x3], name=names(f"{node.name}_3d")),
                   matmul,
                   onnx.helper.make_node("Squeeze", [mm3, axes], [mm_out], name=names(f"{node.name}_2d"))]
            if bias:
                new.append(onnx.helper.make_node("Add", [mm_out, bias], [out], name=names(f"{node.name}_bias")))
            idx = list(graph.node).index(node)
            graph.node.remove(node)
            for k, n in enumerate(new):
                graph.node.insert(idx + k, n)
            count += 1
        return count


def _plain(node: onnx.NodeProto) -> bool:
    floats = {a.name: a.f for a in node.attribute if a.type == onnx.AttributeProto.FLOAT}
    return floats.get("alpha", 1.0) == 1.0 and floats.get("beta", 1.0) == 1.0 and not attribute(node, "transA")


def _read_elsewhere(graph: onnx.GraphProto, tensor: str, node: onnx.NodeProto) -> bool:
    return any(tensor in n.input for n in graph.node if n is not node)
