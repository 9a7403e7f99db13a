"""An ONNX Runtime flavour of an exported graph: transformer fusions into ``com.microsoft`` contrib ops.

The portable ``onnx/dit.onnx`` (plain ONNX ops, what TensorRT parses) spends a CPU step on many small
memory-bound ops. onnxscript's ORT fusion rules (the rewrite library behind ONNX Runtime's dynamo helper) turn
the exporter's decompositions back into single kernels:

    Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul (RMSNorm of q and k)  ->  SimplifiedLayerNormalization
    Mul/MatMul/Add/Softmax/MatMul (scaled dot-product attention) ->  MultiHeadAttention (additive key bias)
    Pow/Mul/Add/Mul/Tanh/Add/Mul (tanh GELU)                     ->  FastGelu
    Reshape/Slice/Squeeze/Mul/Sub/Add/Unsqueeze/Concat (our RoPE) ->  RotaryEmbedding (interleaved), by
                                                                     ``InterleavedRopeFusion`` below

and finally ``UnmaskedAttention`` detaches the text-padding bias from every MultiHeadAttention: with no bias, ONNX
Runtime's CPU kernel takes its flash-attention path (no S×S score tensor; 0.22 s vs 0.33 s for one 3470-token
attention here). The fused graph therefore ignores ``encoder_hidden_states_mask`` and is only valid for unpadded
text (what the runtime feeds: it trims trailing padding and runs CFG as two calls); ``OrtBackend`` refuses a padded
mask on it.

The result is written next to the portable graph as ``<stem>.ort.onnx`` and recorded in the manifest as the
``ort`` variant of the same graph; ONNX Runtime backends prefer it, TensorRT never sees it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from uniref_deploy.runtime.errors import ExportError
from uniref_deploy.runtime.fileio import make_temp_dir
from uniref_deploy.runtime.manifest import ORT_VARIANT, TensorSpec

from .graph_export import name_dynamic_axes
from .graph_pass import GraphPass, consumers
from .onnx_files import EXTERNAL_DATA_THRESHOLD, move_into_place

logger = logging.getLogger(__name__)


def ort_file(portable_file: str) -> str:
    """``onnx/dit.onnx`` -> ``onnx/dit.ort.onnx``."""
    stem, dot, ext = portable_file.rpartition(".")
    return f"{stem}.{ORT_VARIANT}{dot}{ext}"


def fuse_for_ort(src: str | os.PathLike, dst: str | os.PathLike, specs: Sequence[TensorSpec],
                 num_heads: int | None = None, drop_text_mask: bool = True) -> dict[str, int]:
    """Write the ORT-fused copy of graph ``src`` to ``dst`` (+ ``dst.data`` when over 2 GB); returns fusion counts.

    Only fusions that fired are returned (e.g. ``{"rms_normalization": 49, "sdpa_via_mha": 12, "gelu": 23,
    "interleaved_rope": 48, "unmasked_attention": 12}``); the RoPE fusion runs when ``num_heads`` (attention heads
    of the DiT) is given, ``UnmaskedAttention`` when ``drop_text_mask``.

    Raises:
        ExportError: the rewrite failed (the portable graph is untouched either way).
    """
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    src, dst = Path(src), Path(dst)
    tmp_dir = make_temp_dir(dst)
    try:
        model = ir.load(str(src))
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        try:
            model, counts = optimize_for_ort(model)
        except Exception as err:  # onnxscript raises assorted types from its matchers
            raise ExportError(f"ONNX Runtime fusions failed on '{src.name}': {str(err).splitlines()[0]}",
                              "export with --no-ort-fusions; the portable graph is unaffected.") from err
        tmp = tmp_dir / dst.name
        large = size > EXTERNAL_DATA_THRESHOLD * 0.9
        ir.save(model, str(tmp), external_data=dst.name + ".data" if large else None)
        del model
        proto = onnx.load(str(tmp), load_external_data=False)
        if num_heads:
            counts["interleaved_rope"] = InterleavedRopeFusion(num_heads)(proto)
        if drop_text_mask:
            counts["unmasked_attention"] = UnmaskedAttention()(proto)
        name_dynamic_axes(proto, specs)
        onnx.save_model(proto, str(tmp))  # no onnx.checker: it knows no contrib op; validation runs it in ORT
        move_into_place(tmp_dir, dst)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    fired = {k: int(v) for k, v in counts.items() if v}
    logger.info("ORT fusions for %s: %s", dst.name, fired)
    return fired


class InterleavedRopeFusion(GraphPass):
    """``rotate()`` of export/qwen_image.py -> one ``com.microsoft.RotaryEmbedding`` (interleaved=1) per tensor.

    Matches, on x [B, S, H, D] and 2-D tables cos/sin [S, D/2] (graph inputs, broadcast by Unsqueeze):

        pairs = Reshape(x, [.., D/2, 2]);  e, o = Squeeze(Slice|Split(pairs, last axis))  (even, odd)
        out = Reshape(Concat(Unsqueeze(e*c - o*s), Unsqueeze(e*s + o*c), axis=-1), [B, S, H, D])

    and rewires ``out``'s Reshape to RotaryEmbedding(Reshape(x, [B, S, H*D]), position_ids=[0], cos, sin):
    position offset 0 reads row s of the tables for token s, which is how the runtime lays them out.
    """

    name = "interleaved_rope"

    def __init__(self, num_heads: int):
        self.num_heads = num_heads

    def apply(self, model: onnx.ModelProto) -> int:
        """Rewrite ``model`` in place; returns the number of rotations fused (dead nodes are removed)."""
        graph = model.graph
        producer = {o: n for n in graph.node for o in n.output}
        users = consumers(graph)
        constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer if i.dims in ([], [1], [2])}
        before: dict[str, list] = {}  # output name of a node -> new nodes to insert right before it (topological)
        fused = 0
        zero = "uniref_rope_position_offset"
        for concat in list(graph.node):
            match = self._match(concat, producer, users, constants)
            if match is None:
                continue
            x, cos, sin, final = match
            tag = f"uniref_rope_{fused}"
            flat_shape = f"{tag}_flat_shape"
            graph.initializer.append(onnx.numpy_helper.from_array(np.array([0, 0, -1], np.int64), flat_shape))
            before[final.output[0]] = [
                onnx.helper.make_node("Reshape", [x, flat_shape], [f"{tag}_in"], name=f"{tag}_flatten"),
                onnx.helper.make_node("RotaryEmbedding", [f"{tag}_in", zero, cos, sin], [f"{tag}_out"],
                                      name=tag, domain="com.microsoft", interleaved=1, num_heads=self.num_heads),
            ]
            final.input[0] = f"{tag}_out"
            fused += 1
        if fused:
            graph.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), zero))
            ordered = [m for n in graph.node for m in (*before.get(n.output[0], ()), _copy(n))]
            del graph.node[:]
            graph.node.extend(ordered)
            _remove_dead_nodes(graph)
            if not any(op.domain == "com.microsoft" for op in model.opset_import):
                model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        return fused

    def _match(self, concat, producer, consumers, constants):
        if concat.op_type != "Concat" or len(concat.input) != 2 or _attr(concat, "axis") not in (-1, 4):
            return None
        users = consumers.get(concat.output[0], [])
        if len(users) != 1 or users[0].op_type != "Reshape":
            return None
        halves = [producer.get(i) for i in concat.input]
        if any(h is None or h.op_type != "Unsqueeze" for h in halves):
            return None
        first, second = (producer.get(h.input[0]) for h in halves)
        if first is None or second is None or (first.op_type, second.op_type) != ("Sub", "Add"):
            return None
        terms = [[producer.get(i) for i in node.input] for node in (first, second)]
        if any(t is None or t.op_type != "Mul" for pair in terms for t in pair):
            return None
        (ec, os_), (es, oc) = terms  # e*c - o*s, e*s + o*c
        even, c_b = ec.input
        odd, s_b = os_.input
        if (es.input[0], es.input[1], oc.input[0], oc.input[1]) != (even, s_b, odd, c_b):
            return None
        source_e, index_e = _pair_half(even, producer, constants)
        source_o, index_o = _pair_half(odd, producer, constants)
        if source_e is None or source_e != source_o or (index_e, index_o) != (0, 1):
            return None
        pairs = producer.get(source_e)
        cos, sin = (_unsqueezed_table(b, producer) for b in (c_b, s_b))
        if pairs is None or pairs.op_type != "Reshape" or cos is None or sin is None:
            return None
        return pairs.input[0], cos, sin, users[0]


class UnmaskedAttention(GraphPass):
    """Detach the ``attention_bias`` (input 5) of every ``com.microsoft.MultiHeadAttention``; dead nodes go too.

    Only for graphs fed unpadded text: the bias is all zeros then, and without it ONNX Runtime's CPU kernel runs
    flash attention instead of materialising [B, H, S, S] scores.
    """

    name = "unmasked_attention"

    def apply(self, model: onnx.ModelProto) -> int:
        """Rewrite ``model`` in place; returns the number of attention nodes changed."""
        changed = 0
        for node in model.graph.node:
            if node.op_type == "MultiHeadAttention" and node.domain == "com.microsoft" and len(node.input) > 5 \
                    and node.input[5]:
                node.input[5] = ""
                while node.input and not node.input[-1]:
                    del node.input[-1]
                changed += 1
        if changed:
            _remove_dead_nodes(model.graph)
        return changed


def _attr(node, name: str):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _pair_half(name: str, producer, constants) -> tuple[str | None, int]:
    """(tensor, k) when ``name`` is Squeeze(last axis) of element k of the last axis of ``tensor``."""
    squeeze = producer.get(name)
    if squeeze is None or squeeze.op_type != "Squeeze":
        return None, -1
    taken = producer.get(squeeze.input[0])
    if taken is None:
        return None, -1
    if taken.op_type == "Split" and len(taken.output) == 2 and _attr(taken, "axis") == -1:
        return taken.input[0], list(taken.output).index(squeeze.input[0])
    if taken.op_type == "Slice" and len(taken.input) >= 4:
        starts, ends, axes = (constants.get(i) for i in taken.input[1:4])
        if starts is not None and ends is not None and axes is not None and int(axes.ravel()[0]) == -1:
            start, end = int(starts.ravel()[0]), int(ends.ravel()[0])
            if end == start + 1:
                return taken.input[0], start
    return None, -1


def _unsqueezed_table(name: str, producer) -> str | None:
    """The 2-D table behind ``table[None, :, None, :]`` (an Unsqueeze of a graph input), else None."""
    node = producer.get(name)
    if node is None or node.op_type != "Unsqueeze" or node.input[0] in producer:
        return None
    return node.input[0]


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs reach a graph output, then the initializers nothing reads any more."""
    live = {o.name for o in graph.output}
    kept = []
    for n in reversed(graph.node):
        if any(o in live for o in n.output):
            kept.append(n)
            live.update(n.input)
    kept = [_copy(n) for n in reversed(kept)]
    del graph.node[:]
    graph.node.extend(kept)
    for i in reversed(range(len(graph.initializer))):  # by index: no copy of the (large) live weights
        if graph.initializer[i].name not in live:
            del graph.initializer[i]


def contrib_ops(path: str | os.PathLike) -> list[str]:
    """Sorted op types of the graph at ``path`` that standard ONNX lacks (ONNX Runtime contrib ops)."""
    model = onnx.load(str(path), load_external_data=False)
    return sorted({n.op_type for n in model.graph.node if not onnx.defs.has(n.op_type, n.domain or "")})
