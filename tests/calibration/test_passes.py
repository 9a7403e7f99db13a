"""Graph passes on minute ``onnx.helper`` graphs: each edits what it should, returns its count, and no-ops cleanly."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("ml_dtypes")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from uniref_deploy.calibration.layers import attention_targets, find_layers, split_layers  # noqa: E402
from uniref_deploy.calibration.passes import (  # noqa: E402
    PassOptions,
    QuantizeActivationsFP8,
    QuantizeWeightsFP8,
    StoreWeightsFP16,
    UpgradeOpset,
    fp8_passes,
)


def _linear_graph(opset: int = 18) -> onnx.ModelProto:
    """x[B,S,8] -> MatMul(W1[8,16]) -> Relu -> Gemm-free MatMul(W2[16,4]) ; plus an activation-only MatMul."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    scopes = "pkg.torch.onnx.name_scopes"
    n1 = helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1")
    n1.metadata_props.add(key=scopes, value="['', 'transformer.transformer_blocks.0.attn.to_q', 'linear_1']")
    relu = helper.make_node("Relu", ["h"], ["r"], name="relu")
    n2 = helper.make_node("MatMul", ["r", "w2"], ["y0"], name="mm2")
    n2.metadata_props.add(key=scopes, value="['', 'transformer.proj_out', 'linear_2']")
    tr = helper.make_node("Transpose", ["y0"], ["y0t"], name="tr", perm=[0, 2, 1])
    att = helper.make_node("MatMul", ["y0", "y0t"], ["y"], name="node_scaled_dot_product_attention")
    graph = helper.make_graph(
        [n1, relu, n2, tr, att], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", "s"])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _x(s: int = 5) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, s, 8)).astype(np.float32)


def test_upgrade_opset_bumps_once():
    model = _linear_graph()
    assert UpgradeOpset(19)(model) == 1
    assert model.opset_import[0].version == 19 and model.ir_version >= 9
    assert UpgradeOpset(19)(model) == 0


@pytest.mark.parametrize("per_channel", [True, False])
def test_weights_fp8_dequantize_and_stay_close(per_channel):
    model = _linear_graph()
    ref = _run(model, _x())
    UpgradeOpset()(model)
    assert QuantizeWeightsFP8(["mm1", "mm2"], per_channel=per_channel)(model) == 2
    fp8 = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN]
    assert len(fp8) == 2
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 and all(any(a.name == "axis" for a in n.attribute) == per_channel for n in dq)
    onnx.checker.check_model(model, full_check=True)
    out = _run(model, _x())
    cos = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
    assert cos > 0.99


def test_weights_no_match_is_a_noop():
    model = _linear_graph()
    before = model.SerializeToString()
    assert QuantizeWeightsFP8(["missing", "relu"])(model) == 0
    assert model.SerializeToString() == before


def test_activations_share_one_qdq_per_tensor_and_keep_dynamic_axes():
    model = _linear_graph()
    UpgradeOpset()(model)
    targets = [("mm1", 0), ("mm2", 0), ("node_scaled_dot_product_attention", 0)]
    ranges = {"x": 4.0, "r": 8.0, "y0": 0.0}  # y0 has no usable range: skipped
    assert QuantizeActivationsFP8(targets, ranges)(model) == 2
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q) == 2
    onnx.checker.check_model(model, full_check=True)
    for s in (3, 7):
        assert _run(model, _x(s)).shape == (1, s, s)


def test_activations_without_ranges_are_a_noop():
    model = _linear_graph()
    assert QuantizeActivationsFP8([("mm1", 0)], {})(model) == 0


def test_fp16_storage_casts_remaining_weights():
    model = _linear_graph()
    ref = _run(model, _x())
    assert StoreWeightsFP16(min_elements=1)(model) == 2
    assert all(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(_run(model, _x()), ref, rtol=1e-2, atol=1e-2)
    assert StoreWeightsFP16(min_elements=1)(model) == 0


def test_layers_modules_split_and_attention():
    model = _linear_graph()
    layers = find_layers(model)
    assert [ly.module for ly in layers] == ["transformer.transformer_blocks.0.attn.to_q", "transformer.proj_out"]
    quant, high = split_layers(layers, "qwen-image")
    assert [ly.node for ly in quant] == ["mm1"] and [ly.node for ly in high] == ["mm2"]
    assert attention_targets(model) == [("node_scaled_dot_product_attention", 0), ("node_scaled_dot_product_attention", 1)]


@pytest.mark.parametrize("attention", [False, True])
def test_pass_sequence_end_to_end(attention):
    model = _linear_graph()
    ref = _run(model, _x())
    ranges = {"x": float(np.abs(_x()).max()), "y0": 50.0}
    passes = fp8_passes(PassOptions(fp8_attention=attention), ["mm1"], [("mm1", 0)],
                        [("node_scaled_dot_product_attention", 0), ("node_scaled_dot_product_attention", 1)], ranges)
    counts = {p.name: p(model) for p in passes}
    assert counts["upgrade_opset"] == 1 and counts["fp8_weights"] == 1
    assert counts["fp8_activations"] == (2 if attention else 1)
    assert counts["fp16_storage"] == 0  # w2 is under the 1024-element floor
    onnx.checker.check_model(model, full_check=True)
    out = _run(model, _x())
    assert float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref)) > 0.98


def _fp16_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as the fp16 export stores it: fp16 weights and tensors, fp32 graph I/O behind Casts."""
    g = model.graph
    for t in list(g.initializer):
        g.initializer.remove(t)
        g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    g.node.insert(0, helper.make_node("Cast", ["x"], ["x16"], name="in_cast", to=TensorProto.FLOAT16))
    for n in g.node[1:]:
        n.input[:] = ["x16" if i == "x" else i for i in n.input]
        n.output[:] = ["y16" if o == "y" else o for o in n.output]
    g.node.append(helper.make_node("Cast", ["y16"], ["y"], name="out_cast", to=TensorProto.FLOAT))
    return model


def test_fp8_from_the_fp16_graph_keeps_fp16_around_the_gemms():
    from uniref_deploy.calibration.ranges import collect_absmax, tensor_types

    model = _fp16_graph(_linear_graph())
    layers = find_layers(model)
    assert [ly.node for ly in layers] == ["mm1", "mm2"]  # fp16 weights are layers too
    ref = _run(model, _x())
    ranges = collect_absmax(model, ["x16"], [{"x": _x()}])  # an fp16 tensor observed at its own type
    assert ranges["x16"] == pytest.approx(float(np.abs(_x().astype(np.float16)).max()))
    types = tensor_types(model)
    dtypes = {"x16": onnx.helper.tensor_dtype_to_np_dtype(types["x16"])}
    assert dtypes["x16"] == np.float16
    for p in fp8_passes(PassOptions(), ["mm1"], [("mm1", 0)], [], ranges, dtypes):
        p(model)
    onnx.checker.check_model(model, full_check=True)
    scales = [t for t in model.graph.initializer if "scale" in t.name]
    assert scales and all(t.data_type == TensorProto.FLOAT16 for t in scales)
    # no fp32 math was introduced: the only float casts are the graph's own I/O casts
    assert [n.name for n in model.graph.node if n.op_type == "Cast"] == ["in_cast", "out_cast"]
    out = _run(model, _x())
    assert float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref)) > 0.98
