"""``QuantizeWeightsInt8``: store MatMul weights as int8 behind DequantizeLinear (per output channel or blocked)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from uniref_deploy.export.graph_pass import GraphPass, NameGen, initializer_map, node_map
from uniref_deploy.runtime.precision import INT8_MAX


def block_for(k: int, block_size: int) -> int:
    """The block length used for ``k`` input channels: ``block_size`` halved until it divides ``k`` (at least 16,
    ONNX Runtime's smallest ``MatMulNBits`` block), else ``block_size`` with a padded last block."""
    b = block_size
    while b > 16 and k % b:
        b //= 2
    return b if k % b == 0 else block_size


def int8_weight(w: np.ndarray, block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, float32 scale) of a ``[in, out]`` weight, symmetric: scale = absmax / 127.

    ``block_size`` None: one scale per output channel (shape ``[out]``); else one per output channel and block of
    ``block_size`` input channels (shape ``[ceil(in / block_size), out]``, ONNX's blocked layout along axis 0).
    """
    k = w.shape[0]
    if block_size is None:
        amax = np.abs(w).max(axis=0)
        scale = np.maximum(amax / INT8_MAX, np.finfo(np.float32).tiny).astype(np.float32)
        return np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8), scale
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, w.shape[1]), np.float32)
    padded[:k] = w
    amax = np.abs(padded.reshape(blocks, block_size, -1)).max(axis=1)
    scale = np.maximum(amax / INT8_MAX, np.finfo(np.float32).tiny).astype(np.float32)
    q = np.clip(np.rint(w / np.repeat(scale, block_size, axis=0)[:k]), -INT8_MAX, INT8_MAX)
    return q.astype(np.int8), scale


class QuantizeWeightsInt8(GraphPass):
    """Replace the 2-D float weight of each named MatMul with int8 + DequantizeLinear, after folding the
    SmoothQuant factors of its input (``W'[j, :] = s[j] * W[j, :]``) when given.

    Before::

        W (fp32 [in, out]) ──► MatMul

    After (per channel; blocked: scale ``[in / block, out]``, ``axis=0, block_size=block``)::

        W_int8 ─┐
        W_scale ┴► DequantizeLinear(axis=1) ──► MatMul

    The per-channel form is what TensorRT's explicit INT8 quantisation takes; the blocked form is what ONNX
    Runtime turns into ``MatMulNBits`` (int8 compute with activations quantised per row and block on the fly)
    and OpenVINO into a weight-compressed FullyConnected (activations quantised dynamically).

    Args:
        nodes: MatMul node names (Gemm layers first go through ``GemmToMatMul``).
        block_size: None for per-output-channel scales, else the block length along the input channels.
        smooth: activation tensor -> SmoothQuant factors ``s`` (length ``in``) folded into the weights.

    Returns the number of weights quantised.
    """

    name = "int8_weights"

    def __init__(self, nodes: Iterable[str], block_size: int | None = None,
                 smooth: Mapping[str, np.ndarray] | None = None):
        self.nodes = tuple(nodes)
        self.block_size = block_size
        self.smooth = dict(smooth or {})

    def apply(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        by_name, inits = node_map(graph), initializer_map(graph)
        targets = [by_name[n] for n in self.nodes if n in by_name and by_name[n].op_type == "MatMul"]
        targets = [n for n in targets if n.input[1] in inits and len(inits[n.input[1]].dims) == 2
                   and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]
        names = NameGen(graph)
        done: dict[tuple[str, str], str] = {}
        new_nodes: list[onnx.NodeProto] = []
        for node in targets:
            key = (node.input[1], node.input[0] if node.input[0] in self.smooth else "")
            if key not in done:
                w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
                if key[1]:
                    w = w * self.smooth[key[1]][:, None].astype(np.float32)
                block = None if self.block_size is None else block_for(w.shape[0], self.block_size)
                q, scale = int8_weight(w, block)
                q_name, s_name, out = (names(f"{node.input[1]}_int8"), names(f"{node.input[1]}_scale"),
                                       names(f"{node.input[1]}_dq"))
                graph.initializer.extend([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)])
                kwargs = {"axis": 1} if block is None else {"axis": 0, "block_size": block}
                new_nodes.append(onnx.helper.make_node("DequantizeLinear", [q_name, s_name], [out],
                                                       name=names(f"{node.input[1]}_DequantizeLinear"), **kwargs))
                done[key] = out
            node.input[1] = done[key]
        used = {i for n in graph.node for i in n.input}
        for init in list(graph.initializer):
            if init.name in {k[0] for k in done} and init.name not in used:
                graph.initializer.remove(init)
        old = list(graph.node)
        del graph.node[:]
        graph.node.extend(new_nodes + old)
        return len(done)
