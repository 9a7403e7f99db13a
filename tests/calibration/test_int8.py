"""The INT8 DiT (``calibrate --precision int8``) on the tiny artifacts: static and dynamic activations both
measured, integer kernels on ONNX Runtime's optimised graph (and OpenVINO) for every quantised layer, the FP8
path's high-precision layers kept, the static graph in TensorRT's explicit-quantisation form and in the engine
plan, and ``precision="int8"`` selecting it on ONNX Runtime and OpenVINO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

from uniref_deploy.calibration.int8 import INT8_FILE, Int8Options, calibrate_int8  # noqa: E402
from uniref_deploy.calibration.layers import find_layers, split_layers  # noqa: E402
from uniref_deploy.runtime.artifacts import CALIBRATION_INT8_REPORT  # noqa: E402
from uniref_deploy.runtime.compare import psnr  # noqa: E402
from uniref_deploy.runtime.pipeline import Pipeline  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int8_art(tiny_artifacts: Path, tmp_path_factory) -> Path:
    import shutil

    art = tmp_path_factory.mktemp("int8") / "art"
    shutil.copytree(tiny_artifacts, art)
    calibrate_int8(art, Int8Options(eval_steps=8))
    return art


def test_int8_graph_runs_integer_kernels(int8_art: Path) -> None:
    import onnx

    from uniref_deploy.runtime.manifest import Manifest

    manifest = Manifest.load(int8_art)
    info = manifest.graph("dit", "int8").info
    quant, high = split_layers(find_layers(onnx.load(str(int8_art / "onnx/dit.onnx"))), "qwen-image")
    report = json.loads((int8_art / CALIBRATION_INT8_REPORT).read_text())
    assert {"static", "dynamic"} <= set(report["candidates"])  # both modes measured, the chosen one recorded
    assert info["candidate"] == report["chosen"] and info["activation_mode"] in ("static", "dynamic")
    for name, cand in report["candidates"].items():
        kernels = cand["kernels"]["ort"]
        assert kernels["integer_matmuls"] == len(quant) > 0, name
        assert kernels["float_weight_matmuls"] == len(high), name  # only the kept layers stay float
        if cand["kernels"]["openvino"] is not None:
            assert cand["kernels"]["openvino"]["int8"] == len(quant), name
        fig = cand["figures"]["b1024"]
        assert fig["cosine_min"] > 0.99 and fig["latent_psnr_db"] > 30, name
    assert "transformer.proj_out" in info["skipped_layers"]
    # unchanged inputs: the stage is skipped, the file untouched
    before = (int8_art / INT8_FILE).stat().st_mtime_ns
    calibrate_int8(int8_art, Int8Options(eval_steps=8))
    assert (int8_art / INT8_FILE).stat().st_mtime_ns == before


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_precision_int8_selects_the_int8_graph(int8_art: Path, backend: str) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
    rng = np.random.default_rng(0)
    kw = dict(prompt_embeds=rng.standard_normal((1, 9, 32)).astype(np.float32), width=128, height=128,
              num_inference_steps=4, seed=2, output_type="np")
    ref = Pipeline.from_artifacts(int8_art, backend="ort", load_text_encoder=False)(**kw)
    pipe = Pipeline.from_artifacts(int8_art, backend=backend, precision="int8", load_text_encoder=False)
    assert pipe.backends["dit"].graph.precision == "int8"
    out = pipe(**kw)
    assert psnr(out, ref) > 30.0


def _static_graph(art: Path):
    from uniref_deploy.engines.plan import dit_graph
    from uniref_deploy.runtime.manifest import Manifest

    return dit_graph(Manifest.load(art), "int8")


def test_static_graph_is_tensorrt_explicit_int8(int8_art: Path) -> None:
    """Every quantised MatMul reads DQ(int8 weight, one scale per output channel) and DQ(Q(x)) with int8 zero
    points and a scalar scale: the Q/DQ form TensorRT builds INT8 GEMMs from."""
    import onnx
    from onnx import numpy_helper

    graph = _static_graph(int8_art)
    assert graph is not None and graph.info["activation_mode"] == "static"
    model = onnx.load(str(int8_art / graph.file))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    checked = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producer or producer[node.input[1]].op_type != "DequantizeLinear":
            continue
        w_dq, x_dq = producer[node.input[1]], producer[node.input[0]]
        weight, w_scale = inits[w_dq.input[0]], numpy_helper.to_array(inits[w_dq.input[1]])
        assert weight.data_type == onnx.TensorProto.INT8 and w_scale.shape == (weight.dims[1],)
        assert x_dq.op_type == "DequantizeLinear" and producer[x_dq.input[0]].op_type == "QuantizeLinear"
        assert inits[x_dq.input[2]].data_type == onnx.TensorProto.INT8 and numpy_helper.to_array(inits[x_dq.input[1]]).ndim == 0
        checked += 1
    assert checked == graph.info["quantised_layers"]


def test_engine_plan_offers_the_int8_engine(int8_art: Path, capsys) -> None:
    from uniref_deploy.engines.memory import memory_plan, onnx_weight_stats
    from uniref_deploy.engines.plan import make_plan
    from uniref_deploy.runtime.manifest import Manifest
    from uniref_deploy.tools.cli import main

    manifest = Manifest.load(int8_art)
    plan = make_plan(manifest, (1024,), ("fp32", "int8"))
    engine = plan.engine("dit.int8")
    assert engine.onnx_file == _static_graph(int8_art).file
    mem = memory_plan(plan, manifest.model, int8_art, 16)
    weights = {e.engine: e.weight_bytes for e in mem.engines}
    # int8 weights count one byte: the int8 engine holds well under half the fp32 engine's weights
    assert weights["dit.int8"] < 0.5 * weights["dit.fp32"]
    assert weights["dit.int8"] == onnx_weight_stats(int8_art / engine.onnx_file).total
    assert main(["build", str(int8_art), "--budgets", "1024", "--precision", "int8", "--dry-run"]) == 0
    assert "engines/dit.int8.plan" in capsys.readouterr().out


def test_large_int8_graphs_keep_their_weights_beside_them(tiny_artifacts: Path, tmp_path: Path, monkeypatch) -> None:
    """A DiT past protobuf's 2 GB (forced here by lowering the limit) gets INT8 graphs with external data,
    recorded and hashed in the manifest, that ONNX Runtime and OpenVINO load."""
    import shutil

    from uniref_deploy.export import onnx_files
    from uniref_deploy.runtime.manifest import Manifest

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", 0)
    calibrate_int8(art, Int8Options(activations="static", smooth=False, eval_steps=0, samples=2))
    manifest = Manifest.load(art)
    graph = manifest.graph("dit", "int8")
    assert graph.external_data == INT8_FILE + ".data" and (art / graph.external_data).is_file()
    assert graph.info["external_data_sha256"]
    manifest.verify_files(art, (graph.key,))
    assert not list((art / "onnx").glob("dit.static*"))  # candidates moved or removed, no stray data file
    rng = np.random.default_rng(0)
    kw = dict(prompt_embeds=rng.standard_normal((1, 9, 32)).astype(np.float32), width=128, height=128,
              num_inference_steps=2, seed=2, output_type="np")
    ref = Pipeline.from_artifacts(art, backend="ort", load_text_encoder=False)(**kw)
    for backend in ("ort", "openvino") if _has("openvino") else ("ort",):
        out = Pipeline.from_artifacts(art, backend=backend, precision="int8", load_text_encoder=False)(**kw)
        assert psnr(out, ref) > 30.0, backend


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_calibration_that_cannot_fit_in_memory_is_refused_up_front(tiny_artifacts: Path) -> None:
    from uniref_deploy.calibration.int8 import check_memory
    from uniref_deploy.runtime.errors import CalibrationError
    from uniref_deploy.runtime.manifest import Manifest

    fp32 = Manifest.load(tiny_artifacts).graph("dit", "fp32")
    check_memory(tiny_artifacts, fp32, available=1 << 40)
    with pytest.raises(CalibrationError, match=r"needs about .* GiB of memory, but 0\.0 GiB is available"):
        check_memory(tiny_artifacts, fp32, available=1024)
