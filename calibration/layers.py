"""Which matmuls of the exported DiT go to FP8: module names from the graph, per-family high-precision lists.

The dynamo exporter names MatMul weights ``val_NN``; the module path survives in each node's
``pkg.torch.onnx.name_scopes`` metadata (e.g. ``['', 'transformer.transformer_blocks.0.attn.to_q', 'linear_6']``)
and, for Gemm, in the weight initializer's name (``transformer.transformer_blocks.0.img_mod.1.weight``).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import onnx

from uniref_deploy.export.graph_pass import initializer_map

# Layers kept out of FP8 per DiT family: the embedders and the output head (tiny, and the most sensitive).
HIGH_PRECISION: dict[str, tuple[str, ...]] = {
    "qwen-image": (
        "transformer.img_in",
        "transformer.txt_in",
        "transformer.txt_norm",
        "transformer.time_text_embed",
        "transformer.norm_out",
        "transformer.proj_out",
    ),
}
ATTENTION_SCOPE = "scaled_dot_product_attention"
WEIGHT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)  # the fp32 graph's and the fp16 graph's


@dataclass(frozen=True)
class Layer:
    """One linear layer of the graph: the MatMul/Gemm node, its module path, weight and activation tensors."""

    node: str
    module: str
    op: str
    weight: str
    activation: str
    params: int


def _scopes(node: onnx.NodeProto) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return [str(s) for s in ast.literal_eval(p.value)]
            except (ValueError, SyntaxError):
                return []
    return []


def module_name(node: onnx.NodeProto) -> str:
    """The module path of a node (``transformer.transformer_blocks.0.attn.to_q``), or its node name."""
    # the fp16 export wraps the DiT (``inner.transformer...``): keep the path from its ``transformer`` part
    parts = [sc.split(".") for sc in _scopes(node)]
    modules = [".".join(p[p.index("transformer"):]) for p in parts if "transformer" in p]
    if modules:
        return modules[-1]
    if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1].endswith(".weight"):
        return node.input[1][: -len(".weight")]
    return node.name


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """Every MatMul/Gemm whose input 1 is a 2-D fp32 or fp16 weight initializer, in graph order."""
    inits = initializer_map(model.graph)
    layers = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        if w is None or len(w.dims) != 2 or w.data_type not in WEIGHT_TYPES:
            continue
        layers.append(Layer(node.name, module_name(node), node.op_type, node.input[1], node.input[0],
                            int(w.dims[0] * w.dims[1])))
    return layers


def split_layers(layers: list[Layer], family: str) -> tuple[list[Layer], list[Layer]]:
    """(quantised, kept high-precision) by the family's ``HIGH_PRECISION`` prefixes."""
    keep = HIGH_PRECISION.get(family, HIGH_PRECISION["qwen-image"])
    high = [ly for ly in layers if any(ly.module == k or ly.module.startswith(k + ".") for k in keep)]
    names = {ly.node for ly in high}
    return [ly for ly in layers if ly.node not in names], high


def attention_targets(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """Both inputs of the attention q·kᵀ and p·v MatMuls (no initializer inputs, inside SDPA's scope)."""
    inits = initializer_map(model.graph)
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or any(i in inits for i in node.input):
            continue
        if ATTENTION_SCOPE in (_scopes(node) or [""])[-1] or ATTENTION_SCOPE in node.name:
            out += [(node.name, 0), (node.name, 1)]
    return out
