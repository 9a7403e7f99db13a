"""Edit-2511's ``zero_cond_t`` DiT through every export path, run at batch 1 and 2 against diffusers.

The model is the ``tiny`` preset with ``zero_cond_t: true`` (the flag adds no weights). It is exported regularly
(portable graph + ORT-fused variant) and memory-lean (through the CLI); each DiT graph runs in ONNX Runtime at
batch 1 and 2 against diffusers' ``QwenImageTransformer2DModel``, and an ORT edit without and with CFG matches
diffusers' ``QwenImageEditPlusPipeline``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from uniref_deploy.export.exporter import ExportOptions, export_onnx  # noqa: E402
from uniref_deploy.export.samples import dit_sample  # noqa: E402
from uniref_deploy.runtime.backends.torch_ref import TorchDitBackend  # noqa: E402
from uniref_deploy.runtime.manifest import Manifest  # noqa: E402
from uniref_deploy.runtime.packing import pack_references  # noqa: E402

pytestmark = pytest.mark.slow

TOLERANCE = 2.0 / 255.0


@pytest.fixture(scope="module")
def regular_art(tiny_zero_cond_model_dir: Path, tmp_path_factory) -> Path:
    art = tmp_path_factory.mktemp("zc") / "art"
    export_onnx(tiny_zero_cond_model_dir, art, ExportOptions(budgets=(1024,), dtypes=("fp32",), validate=False,
                                                             lean=False))
    return art


@pytest.fixture(scope="module")
def lean_art(tiny_zero_cond_model_dir: Path, tmp_path_factory) -> Path:
    from uniref_deploy.tools.cli import main

    art = tmp_path_factory.mktemp("zc-lean") / "art"
    rc = main(["export", str(tiny_zero_cond_model_dir), "--out", str(art), "--lean", "--dtypes", "fp32",
               "--no-validate"])
    assert rc == 0
    return art


@pytest.mark.parametrize("which", ["regular", "lean"])
@pytest.mark.parametrize("variant", ["", "ort"])
def test_dit_graphs_run_at_batch_1_and_2(request, tiny_zero_cond_model_dir: Path, which: str, variant: str) -> None:
    art = request.getfixturevalue(f"{which}_art")
    manifest = Manifest.load(art)
    spec = manifest.graph("dit", "fp32", variant)
    assert spec.validated and spec.info["smoke"]["batches"] == [1, 2]
    assert manifest.stage("export").results["lean"] is (which == "lean")
    sess = ort.InferenceSession(str(art / spec.file), providers=["CPUExecutionProvider"])
    layout = pack_references([(96, 64), (40, 120)], 128 * 96, policy="per-image", width=64, height=48)
    with TorchDitBackend(manifest.model, tiny_zero_cond_model_dir) as reference:
        for batch in (1, 2):
            feeds = dit_sample(manifest.model, layout, 11, batch=batch, seed=batch).feeds
            got = sess.run(None, feeds)[0]
            expected = reference.infer(feeds)["velocity"]
            assert got.shape == expected.shape == (batch, layout.num_image_tokens, 16)
            assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), (which, variant, batch)


@pytest.mark.parametrize("negative", [None, "blurry, low quality"], ids=["no-cfg", "cfg"])
def test_ort_edit_matches_diffusers(regular_art: Path, tiny_zero_cond_model_dir: Path, negative: str | None) -> None:
    from diffusers import QwenImageEditPlusPipeline
    from PIL import Image

    from uniref_deploy.runtime.pipeline import Pipeline

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8))
    latents = rng.standard_normal((1, (48 // 16) * (64 // 16), 16), dtype=np.float32)
    kw = dict(image=[image], prompt="Make the sky red.", negative_prompt=negative, true_cfg_scale=4.0,
              num_inference_steps=2, width=64, height=48, output_type="np")
    ours = Pipeline.from_artifacts(regular_art, backend="ort")(**kw, budget=1024 * 1024, policy="per-image",
                                                                latents=latents.copy())
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_zero_cond_model_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.zero_cond_t
    theirs = np.asarray(pipe(**kw, latents=torch.from_numpy(latents.copy())).images[0], dtype=np.float32)
    assert ours.shape == theirs.shape == (48, 64, 3)
    assert float(np.abs(ours - theirs).max()) <= TOLERANCE
    assert float(theirs.std()) > 1e-3


def test_unvalidated_fused_variant_is_not_preferred(regular_art: Path, tmp_path: Path) -> None:
    from uniref_deploy.runtime.backends.ort import OrtBackendFactory

    art = tmp_path / "art"
    shutil.copytree(regular_art, art)
    manifest = Manifest.load(art)
    assert OrtBackendFactory.create(manifest.model, art, manifest)["dit"].graph.variant == "ort"
    fused = manifest.graph("dit", "fp32", "ort")
    for info in ({k: v for k, v in fused.info.items() if k not in ("smoke", "validation")},
                 {**fused.info, "smoke": {**fused.info["smoke"], "passed": False}}):
        changed = manifest.without_graph(fused.key).with_graph(type(fused)(**{**fused.__dict__, "info": info}))
        assert OrtBackendFactory.create(changed.model, art, changed)["dit"].graph.variant == ""


def test_lean_export_consuming_shards_smoke_validates_a_twin(tiny_zero_cond_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_zero_cond_model_dir, model)
    shards = sorted((model / "transformer").glob("*.safetensors"))
    manifest = export_onnx(model, tmp_path / "art", ExportOptions(dtypes=("fp32",), validate=False, lean=True,
                                                                  consume_shards=True, ort_fusions=False))
    assert shards and not any(s.exists() for s in shards)  # streamed, then deleted
    smoke = manifest.graph("dit", "fp32").info["smoke"]
    assert smoke["passed"] is True and smoke["twin_layers"] == 2 and smoke["batches"] == [1, 2]
    rows = json.loads((tmp_path / "art" / "reports" / "export_validation.json").read_text())
    assert {r["graph"] for r in rows if r["sample"].startswith("smoke")} >= {"dit (2-block twin)", "vae_encoder"}


def test_openvino_bf16_splits_the_zero_cond_timestep_projection(regular_art: Path) -> None:
    """2511's DiT projects [t, 0] per sample: its sinusoids still come from ``timestep`` alone, so OpenVINO's
    bf16 backend computes them in its f32 pre-model, at batch 1 and 2, close to f32."""
    ov = pytest.importorskip("openvino")
    from uniref_deploy.runtime.backends.openvino import OpenVinoBackend, native_bf16
    from uniref_deploy.runtime.compare import compare

    if not native_bf16():
        pytest.skip("this CPU has no native bf16 (AMX / AVX-512 BF16)")
    assert ov is not None
    manifest = Manifest.load(regular_art)
    spec = manifest.graph("dit", "fp32")
    layout = pack_references([(96, 64), (40, 120)], 128 * 96, policy="per-image", width=64, height=48)
    with OpenVinoBackend(spec, regular_art, "bf16") as bf16, OpenVinoBackend(spec, regular_art, "fp32") as f32:
        assert bf16.islands is not None and bf16.islands.pre_inputs == ("timestep",)
        for batch in (1, 2):
            feeds = dit_sample(manifest.model, layout, 11, batch=batch, seed=batch).feeds
            feeds["timestep"] = np.ones_like(feeds["timestep"])
            got, want = bf16.infer(feeds)["velocity"], f32.infer(feeds)["velocity"]
            assert got.shape == want.shape == (batch, layout.num_image_tokens, 16)
            assert compare("velocity", got, want).cosine > 0.9999, batch  # measured 1 - 1.8e-5 at both
