"""engines/refit.py on a toy graph through the TensorRT stand-in (tests/fakes): which weights a refit sets.

The stand-in treats weights feeding one node as combined (TensorRT's "missing" weights); its engines run the ONNX
graph in ONNX Runtime. These check this project's refit calls, not TensorRT.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from uniref_deploy.runtime.errors import EngineBuildError
from uniref_deploy.runtime.manifest import EngineSpec

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _graph(path: Path, scale: np.ndarray, bias: np.ndarray) -> None:
    """y = x * (scale + bias): ``scale`` and ``bias`` feed one node, so a refit of one needs the other."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Add", ["scale", "bias"], ["sb"]), helper.make_node("Mul", ["x", "sb"], ["y"])]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def _engine(trt, art: Path, refit: bool) -> EngineSpec:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, logger).parse_from_file(str(art / "g.onnx"))
    config = builder.create_builder_config()
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    data = bytes(builder.build_serialized_network(network, config))
    (art / "g.plan").write_bytes(data)
    return EngineSpec("dit", "fp32", "g.plan", hashlib.sha256(data).hexdigest(), (4096,),
                      {"profiles": [], "builder_optimization_level": 3, "strongly_typed": True, "refittable": refit,
                       "onnx_file": "g.onnx"})


def _run(trt, art: Path, x: np.ndarray) -> np.ndarray:
    """The plan's graph as the stand-in engine holds it, run in ONNX Runtime (the stand-in's executor)."""
    import onnxruntime as ort

    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine((art / "g.plan").read_bytes())
    sess = ort.InferenceSession(engine.model_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_refit_sets_changed_and_combined_weights(tmp_path, fake_trt):
    from uniref_deploy.engines.refit import refit_engine

    ones = np.ones(4, np.float32)
    _graph(tmp_path / "g.onnx", ones, ones)
    spec = _engine(fake_trt, tmp_path, refit=True)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(_run(fake_trt, tmp_path, x), 2 * x)

    refits = fake_trt.STATS["refits"]
    new_scale, new_bias = np.array([1, 2, 3, 4], np.float32), np.full(4, -0.5, np.float32)
    _graph(tmp_path / "g.onnx", new_scale, new_bias)
    new = refit_engine(tmp_path, spec, "g.onnx", "f" * 64, ["scale"])  # "bias" changed too: TensorRT asks for it
    assert new.provenance["refit"]["weights"] == 2 and new.provenance["onnx_sha256"] == "f" * 64
    assert new.sha256 == hashlib.sha256((tmp_path / "g.plan").read_bytes()).hexdigest() != spec.sha256
    np.testing.assert_array_equal(_run(fake_trt, tmp_path, x), x * (new_scale + new_bias))
    assert fake_trt.STATS["refits"] == refits + 1


def test_refit_refusals_are_one_line_errors(tmp_path, fake_trt):
    from uniref_deploy.engines.refit import refit_engine

    ones, refits = np.ones(4, np.float32), fake_trt.STATS["refits"]
    _graph(tmp_path / "g.onnx", ones, ones)
    plain = _engine(fake_trt, tmp_path, refit=False)
    with pytest.raises(EngineBuildError, match="not built refittable"):
        refit_engine(tmp_path, plain, "g.onnx", "0" * 64, ["scale"])
    spec = _engine(fake_trt, tmp_path, refit=True)
    _graph(tmp_path / "g.onnx", np.ones(2, np.float32), np.ones(2, np.float32))  # another size: not this engine's
    before = (tmp_path / "g.plan").read_bytes()
    with pytest.raises(EngineBuildError, match="does not accept new weights 'scale'"):
        refit_engine(tmp_path, spec, "g.onnx", "0" * 64, ["scale"])
    with pytest.raises(EngineBuildError, match="no float initializer"):
        refit_engine(tmp_path, spec, "g.onnx", "0" * 64, ["nope"])
    assert (tmp_path / "g.plan").read_bytes() == before and fake_trt.STATS["refits"] == refits
