"""The INT8 DiT (``calibrate --precision int8``) on the tiny artifacts: integer kernels on ONNX Runtime's optimised
graph for every quantised layer, the FP8 path's high-precision layers kept, accuracy over a denoising run, and
``precision="int8"`` selecting it on ONNX Runtime and OpenVINO."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

from uniref_deploy.calibration.int8 import INT8_FILE, Int8Options, calibrate_int8  # noqa: E402
from uniref_deploy.calibration.layers import find_layers, split_layers  # noqa: E402
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
    kernels = info["ort_kernels"]
    assert kernels["integer_matmuls"] == len(quant) > 0
    assert kernels["float_weight_matmuls"] == len(high)  # only the kept layers stay float
    assert "transformer.proj_out" in info["skipped_layers"]
    fig = info["figures"]["b1024"]
    assert fig["cosine_min"] > 0.99 and fig["latent_psnr_db"] > 30
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
