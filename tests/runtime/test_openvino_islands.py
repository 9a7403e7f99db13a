"""The f32-island split for OpenVINO bf16: which nodes it moves, that the split graph computes the same thing, and
that graphs without islands are left alone (synthetic graphs built with OpenVINO's opset)."""

from __future__ import annotations

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
ops = pytest.importorskip("openvino.opset13")

from uniref_deploy.runtime.backends.openvino_islands import ISLAND_PREFIX, split_f32_islands  # noqa: E402


def _const(shape: tuple[int, ...], seed: int):
    return ops.constant(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _timestep_model():
    """x:[B,4,8], timestep:[B] -> sinusoid of 1000*t (the island), a linear on it added to a linear of x, then a
    Sin of that matmul output (not an island: a matmul lies on its way)."""
    t = ops.parameter([-1], np.float32, name="timestep")
    x = ops.parameter([-1, 4, 8], np.float32, name="x")
    freq = ops.constant((1000.0 * np.exp(-np.arange(8) / 2.0)).astype(np.float32)[None, :])
    arg = ops.multiply(ops.unsqueeze(t, ops.constant(np.int64(1))), freq)
    s, c = ops.sin(arg), ops.cos(arg)
    s.set_friendly_name("proj_sin")
    c.set_friendly_name("proj_cos")
    temb = ops.matmul(ops.concat([c, s], 1), _const((16, 8), 1), False, False)
    h = ops.add(ops.matmul(x, _const((8, 8), 2), False, False), ops.unsqueeze(temb, ops.constant(np.int64(1))))
    late = ops.sin(h)
    late.set_friendly_name("late_sin")
    out = ops.result(late)
    out.output(0).get_tensor().set_names({"out"})
    return ov.Model([out], [x, t], "timestep_model")


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(4).standard_normal((2, 4, 8)).astype(np.float32),
            "timestep": np.array([1.0, 0.37], np.float32)}


def _run(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    names = [p.get_friendly_name() for p in model.get_parameters()]
    return np.asarray(compiled.create_infer_request().infer({k: feeds[k] for k in names})[compiled.outputs[0]])


def test_sinusoids_of_inputs_move_to_the_pre_model() -> None:
    split = split_f32_islands(_timestep_model())
    assert split.islands == ("proj_cos", "proj_sin") or split.islands == ("proj_sin", "proj_cos")
    assert split.pre_inputs == ("timestep",)
    # timestep fed only the islands: the main model reads the island tensors instead
    assert sorted(split.main_inputs) == sorted(["x", ISLAND_PREFIX + "proj_sin", ISLAND_PREFIX + "proj_cos"])
    kinds = [op.get_type_name() for op in split.main.get_ordered_ops()]
    assert kinds.count("Sin") == 1  # late_sin stays: it follows a matmul
    assert "Sin" in [op.get_type_name() for op in split.pre.get_ordered_ops()]


def test_split_graph_computes_the_same_in_f32() -> None:
    feeds = _feeds()
    expected = _run(_timestep_model().clone(), feeds)
    split = split_f32_islands(_timestep_model())
    pre = ov.Core().compile_model(split.pre, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    island_values = pre.create_infer_request().infer({"timestep": feeds["timestep"]})
    feeds.update({port.get_any_name(): np.asarray(island_values[port]) for port in pre.outputs})
    got = _run(split.main, feeds)
    assert float(np.abs(expected).max()) > 0.1
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_graph_without_islands_is_left_alone() -> None:
    x = ops.parameter([-1, 8], np.float32, name="x")
    model = ov.Model([ops.result(ops.sin(ops.matmul(x, _const((8, 8), 3), False, False)))], [x], "plain")
    split = split_f32_islands(model)
    assert split.pre is None and split.islands == () and split.main is model
    assert split.main_inputs == ("x",)


def test_parameter_still_used_elsewhere_stays_in_main() -> None:
    t = ops.parameter([-1, 1], np.float32, name="t")
    island = ops.sin(ops.multiply(t, ops.constant(np.float32(500.0))))
    model = ov.Model([ops.result(ops.add(island, t))], [t], "shared")
    split = split_f32_islands(model)
    assert split.pre_inputs == ("t",)
    assert "t" in split.main_inputs
