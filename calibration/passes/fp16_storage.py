"""``StoreWeightsFP16``: keep high-precision matmul weights in fp16 storage, computed in fp32."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from uniref_deploy.export.graph_pass import GraphPass, NameGen, initializer_map
from uniref_deploy.runtime.precision import FP16_MAX


class StoreWeightsFP16(GraphPass):
    """Store the remaining fp32 weights/biases of MatMul/Gemm (the layers kept out of FP8) as fp16 + Cast.

    Before::

        W (fp32 initializer) ──► MatMul/Gemm

    After::

        W_fp16 (fp16 initializer) ──► Cast(to=float) ──► MatMul/Gemm

    The arithmetic stays fp32 (TensorRT strongly-typed builds keep it that way); only the file shrinks, so
    the FP8 graph is never larger than the fp16 one. Weights with values beyond the fp16 range or fewer
    than ``min_elements`` elements are left alone. Returns the number of initializers converted.
    """

    name = "fp16_storage"

    def __init__(self, min_elements: int = 1024):
        self.min_elements = min_elements

    def apply(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        inits = initializer_map(graph)
        wanted: list[str] = []
        for node in graph.node:
            if node.op_type not in ("MatMul", "Gemm"):
                continue
            for name in node.input[1:]:
                t = inits.get(name)
                if (t is not None and t.data_type == onnx.TensorProto.FLOAT and name not in wanted
                        and int(np.prod(t.dims)) >= self.min_elements):
                    wanted.append(name)
        arrays = {n: numpy_helper.to_array(inits[n]) for n in wanted}
        wanted = [n for n in wanted if np.abs(arrays[n]).max() < FP16_MAX]
        if not wanted:
            return 0
        names = NameGen(graph)
        casts: list[onnx.NodeProto] = []
        renamed: dict[str, str] = {}
        for name in wanted:
            half = names(f"{name}_fp16")
            graph.initializer.remove(inits[name])
            graph.initializer.append(numpy_helper.from_array(arrays[name].astype(np.float16), half))
            out = names(f"{name}_f32")
            casts.append(onnx.helper.make_node("Cast", [half], [out], name=names(f"{name}_Cast"),
                                               to=onnx.TensorProto.FLOAT))
            renamed[name] = out
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in renamed:
                    node.input[i] = renamed[name]
        old = list(graph.node)
        del graph.node[:]
        graph.node.extend(casts + old)
        return len(wanted)
