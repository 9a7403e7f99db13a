"""export/ort_fusions.py: the RoPE fusion on real exporter output, and the fused DiT variant of the tiny preset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

import onnx  # noqa: E402

from uniref_deploy.export.ort_fusions import InterleavedRopeFusion, contrib_ops, fuse_for_ort, ort_file  # noqa: E402
from uniref_deploy.export.qwen_image import rotate  # noqa: E402
from uniref_deploy.runtime.manifest import Manifest, TensorSpec  # noqa: E402

HEADS, DIM = 3, 8


class Rotate(torch.nn.Module):
    def forward(self, x, cos, sin):
        return rotate(x, cos, sin) * 2.0


class NotARotation(torch.nn.Module):
    """Same shapes and op types, but e*c + o*s: must not be fused."""

    def forward(self, x, cos, sin):
        e, o = x.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return torch.stack((e * c + o * s, e * s + o * c), dim=-1).flatten(-2)


def _export(module: torch.nn.Module, path: Path) -> list[TensorSpec]:
    from uniref_deploy.export.graph_export import export_graph

    specs = [TensorSpec("x", "float32", ("batch", "img_tokens", HEADS, DIM)),
             TensorSpec("cos", "float32", ("img_tokens", DIM // 2)), TensorSpec("sin", "float32", ("img_tokens", DIM // 2))]
    out = [TensorSpec("y", "float32", ("batch", "img_tokens", HEADS, DIM))]
    args = (torch.randn(2, 5, HEADS, DIM), torch.randn(5, DIM // 2), torch.randn(5, DIM // 2))
    export_graph(module, args, path, specs, out)
    return [*specs, *out]


def _feeds(tokens: int, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(tokens)
    angle = rng.uniform(0, 6, (tokens, DIM // 2)).astype(np.float32)
    return {"x": rng.standard_normal((batch, tokens, HEADS, DIM), dtype=np.float32),
            "cos": np.cos(angle), "sin": np.sin(angle)}


@pytest.mark.slow  # torch.onnx.export of a rotation module (~5 s each)
def test_rope_fusion_matches_torch_at_two_lengths(tmp_path: Path) -> None:
    specs = _export(Rotate(), tmp_path / "rope.onnx")
    counts = fuse_for_ort(tmp_path / "rope.onnx", tmp_path / "rope.ort.onnx", specs, num_heads=HEADS)
    assert counts.get("interleaved_rope") == 1
    assert contrib_ops(tmp_path / "rope.ort.onnx") == ["RotaryEmbedding"]
    fused = onnx.load(str(tmp_path / "rope.ort.onnx"))
    assert not any(n.op_type in ("Sub", "Slice", "Squeeze") for n in fused.graph.node)  # the decomposition is gone
    sess = ort.InferenceSession(str(tmp_path / "rope.ort.onnx"), providers=["CPUExecutionProvider"])
    for tokens in (7, 19):
        feeds = _feeds(tokens)
        expected = Rotate()(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        np.testing.assert_allclose(sess.run(None, feeds)[0], expected, rtol=0, atol=1e-5)


@pytest.mark.slow  # torch.onnx.export of a rotation module (~5 s each)
def test_rope_fusion_leaves_other_arithmetic_alone(tmp_path: Path) -> None:
    _export(NotARotation(), tmp_path / "other.onnx")
    model = onnx.load(str(tmp_path / "other.onnx"))
    before = [n.op_type for n in model.graph.node]
    assert InterleavedRopeFusion(HEADS).apply(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_ort_file_names_the_variant() -> None:
    assert ort_file("onnx/dit.onnx") == "onnx/dit.ort.onnx"


@pytest.mark.slow  # tiny_artifacts
def test_tiny_dit_variant_fuses_every_rotation(tiny_artifacts: Path) -> None:
    fused = Manifest.load(tiny_artifacts).graph("dit", "fp32", "ort")
    layers = int(Manifest.load(tiny_artifacts).model.transformer["num_layers"])
    assert fused.info["fusions"]["interleaved_rope"] == 4 * layers  # image and text q, k per block
    assert "RotaryEmbedding" in fused.info["contrib_ops"]


def test_unmasked_attention_detaches_the_bias_and_its_producers() -> None:
    from onnx import TensorProto, helper

    from uniref_deploy.export.ort_fusions import UnmaskedAttention

    s, d = "s", 16
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, s, d]) for n in "qkv"]
    keep = helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, s])
    nodes = [
        helper.make_node("Where", ["keep", "zero", "neg"], ["bias2d"]),
        helper.make_node("Unsqueeze", ["bias2d", "axes"], ["bias4d"]),
        helper.make_node("Expand", ["bias4d", "full"], ["bias"]),
        helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "bias"], ["y"], domain="com.microsoft",
                         num_heads=2),
    ]
    inits = [onnx.numpy_helper.from_array(np.array(v, dtype), n) for n, v, dtype in
             (("zero", 0.0, np.float32), ("neg", -1e30, np.float32), ("axes", [1, 2], np.int64),
              ("full", [1, 1, 5, 5], np.int64))]
    graph = helper.make_graph(nodes, "g", [*io, keep], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, 5, d), dtype=np.float32) for n in "qkv"} | {"keep": np.ones((1, 5), bool)}
    masked = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert UnmaskedAttention().apply(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MultiHeadAttention"]
    assert list(model.graph.node[0].input) == ["q", "k", "v"] and not model.graph.initializer
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    unmasked = sess.run(None, {n: feeds[n] for n in "qkv"} | {"keep": feeds["keep"]})[0]
    np.testing.assert_allclose(unmasked, masked, rtol=0, atol=1e-6)  # all-kept mask: the same attention
