"""The INT8 graph passes on small synthetic graphs run by ONNX Runtime: Gemm -> MatMul keeps the function, the
static (Q/DQ, with and without SmoothQuant) and dynamic (blocked weights) forms become integer kernels in ONNX
Runtime's optimised graph, and SmoothQuant lowers the per-tensor error on a tensor with outlier channels."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("onnxruntime")

from uniref_deploy.calibration.int8_kernels import INTEGER_OPS, float_weight_matmuls, integer_kernels  # noqa: E402
from uniref_deploy.calibration.passes.gemm_matmul import GemmToMatMul  # noqa: E402
from uniref_deploy.calibration.passes.int8_activations import QuantizeActivationsInt8  # noqa: E402
from uniref_deploy.calibration.passes.int8_weights import QuantizeWeightsInt8, block_for, int8_weight  # noqa: E402
from uniref_deploy.calibration.passes.opset import UpgradeOpset  # noqa: E402
from uniref_deploy.calibration.ranges import session  # noqa: E402
from uniref_deploy.calibration.smoothquant import outlier_ratio, plan_smoothing, smoothed_amax  # noqa: E402

K, N, T = 96, 128, 40


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    """x [1, T, K] feeds three MatMuls (q/k/v-like, + bias); m [B, K] feeds a Gemm (transB, bias), like adaLN."""
    inits, nodes = [], []
    for i in range(3):
        inits += [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32) * 0.1, f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"mm{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"y{i}"], name=f"add{i}")]
    inits += [numpy_helper.from_array(rng.standard_normal((N, K)).astype(np.float32) * 0.1, "wg"),
              numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "bg")]
    nodes.append(helper.make_node("Gemm", ["m", "wg", "bg"], ["yg"], name="gemm", transB=1))
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, "T", N]) for i in range(3)]
    outputs.append(helper.make_tensor_value_info("yg", TensorProto.FLOAT, ["B", N]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", K]),
                                           helper.make_tensor_value_info("m", TensorProto.FLOAT, ["B", K])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def _feeds(rng: np.random.Generator, outliers: bool = False) -> dict[str, np.ndarray]:
    x = rng.standard_normal((1, T, K)).astype(np.float32)
    if outliers:
        x[..., [3, 50]] *= 60.0  # a few channels far above the rest, as trained DiTs show
    return {"x": x, "m": rng.standard_normal((2, K)).astype(np.float32)}


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _quantise(model: onnx.ModelProto, feeds: dict | None, block: int | None, smooth: bool = False) -> onnx.ModelProto:
    """The int8.py recipe on the synthetic graph: ranges from ``feeds`` (static) or none (dynamic)."""
    q = onnx.ModelProto()
    q.CopyFrom(model)
    nodes = ["mm0", "mm1", "mm2", "gemm"]
    GemmToMatMul(["gemm"])(q)
    UpgradeOpset(21 if block else 19)(q)
    inputs = {n.name: n.input[0] for n in q.graph.node if n.name in nodes}
    factors = {}
    if block is None:
        amax = {inputs["mm0"]: np.abs(feeds["x"]).reshape(-1, K).max(0), inputs["gemm"]: np.abs(feeds["m"]).max(0)}
        if smooth:
            weights = {"x": [numpy_helper.to_array(t) for t in model.graph.initializer if t.name in ("w0", "w1", "w2")]}
            factors = plan_smoothing({"x": amax["x"]}, weights, alpha=0.5, ratio=8.0)
        QuantizeWeightsInt8(nodes, None, factors)(q)
        QuantizeActivationsInt8([(n, 0) for n in nodes], smoothed_amax(amax, factors), factors)(q)
    else:
        QuantizeWeightsInt8(nodes, block)(q)
    return q


def test_gemm_to_matmul_keeps_the_function() -> None:
    rng = np.random.default_rng(0)
    model, feeds = _model(rng), _feeds(rng)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert GemmToMatMul(["gemm", "mm0"])(rewritten) == 1  # MatMul nodes are left alone
    assert "Gemm" not in {n.op_type for n in rewritten.graph.node}
    for got, want in zip(_run(rewritten, feeds), _run(model, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [None, 32])
def test_int8_weight_round_trip(block: int | None) -> None:
    w = np.random.default_rng(1).standard_normal((K, N)).astype(np.float32)
    q, scale = int8_weight(w, block)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    back = q * (scale if block is None else np.repeat(scale, block, axis=0)[:K])
    assert np.abs(back - w).max() <= scale.max() / 2 + 1e-6


def test_block_for_divides_the_input_channels() -> None:
    assert block_for(3072, 128) == 128 and block_for(96, 128) == 32 and block_for(64, 128) == 64


@pytest.mark.parametrize("mode", ["static", "static+smoothquant", "dynamic"])
def test_quantised_layers_run_as_integer_kernels(mode: str, tmp_path) -> None:
    rng = np.random.default_rng(2)
    model, feeds = _model(rng), _feeds(rng, outliers=True)
    q = _quantise(model, feeds, 32 if mode == "dynamic" else None, smooth=mode.endswith("smoothquant"))
    path = tmp_path / "q.onnx"
    onnx.save(q, str(path))
    kernels = integer_kernels(path)
    assert kernels["integer_matmuls"] == 4 and kernels["float_weight_matmuls"] == 0
    assert set(kernels["integer_ops"]) <= set(INTEGER_OPS)
    assert float_weight_matmuls(model) == 4  # what the check counts on the float graph
    for got, want in zip(_run(q, feeds), _run(model, feeds), strict=True):
        assert _rel(got, want) < 0.1


def test_smoothquant_lowers_the_per_tensor_error_on_outliers() -> None:
    rng = np.random.default_rng(3)
    model, feeds = _model(rng), _feeds(rng, outliers=True)
    assert outlier_ratio(np.abs(feeds["x"]).reshape(-1, K).max(0)) > 8
    want = _run(model, feeds)
    plain = _run(_quantise(model, feeds, None), feeds)
    smooth = _run(_quantise(model, feeds, None, smooth=True), feeds)
    err = [np.mean([_rel(g, w) for g, w in zip(out[:3], want[:3], strict=True)]) for out in (plain, smooth)]
    assert err[1] < 0.5 * err[0]
