"""``export --lora``: LoRAs in each key format, fused at export, match diffusers' pipeline with the LoRA fused.

The ground truth is diffusers' ``QwenImageEditPlusPipeline`` with ``load_lora_weights`` + ``fuse_lora(lora_scale)``;
ours is the ONNX Runtime pipeline over an artifact exported with ``--lora FILE:0.7``. Bad LoRA input fails with one
line, exit 2, and leaves the artifact folder as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("onnxruntime")

from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus  # noqa: E402
from lora_factory import FORMATS, lora_factors, write_lora  # noqa: E402
from PIL import Image  # noqa: E402

from uniref_deploy.export.lora import LoraSpec  # noqa: E402
from uniref_deploy.runtime.errors import InputError  # noqa: E402
from uniref_deploy.tools.cli import main  # noqa: E402

SCALE = 0.7
TOLERANCE = 2.0 / 255.0
AREA, WIDTH, HEIGHT, STEPS = 1024 * 1024, 64, 48, 2  # AREA: the compiled bucket = diffusers' VAE_IMAGE_SIZE
EXPORT_FLAGS = ["--dtypes", "fp32", "--no-validate", "--no-ort-fusions"]


@pytest.fixture(scope="module")
def factors(tiny_model_dir: Path) -> dict:
    # strength 3: on tiny a weaker LoRA moves the edit by only ~2 tolerances (measured 0.017 at strength 1)
    return lora_factors(QwenImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer"), strength=3.0)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loras")


def _edit_inputs(config_channels: int) -> dict:
    rng = np.random.default_rng(0)
    ref = Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8))
    latents = np.random.default_rng(1).standard_normal((1, (HEIGHT // 16) * (WIDTH // 16), 4 * config_channels),
                                                       dtype=np.float32)
    return {"image": [ref], "prompt": "add a red hat", "width": WIDTH, "height": HEIGHT, "latents": latents}


def _diffusers_edit(model_dir: Path, lora: Path | None, inputs: dict) -> np.ndarray:
    with pytest.MonkeyPatch.context() as mp:
        assert edit_plus.VAE_IMAGE_SIZE == AREA  # each reference at the bucket's area, as our per-image policy
        mp.setattr(edit_plus, "CONDITION_IMAGE_SIZE", 56 * 56)
        pipe = QwenImageEditPlusPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(str(lora), adapter_name="test")
            pipe.fuse_lora(lora_scale=SCALE)
        out = pipe(image=inputs["image"], prompt=inputs["prompt"], num_inference_steps=STEPS, true_cfg_scale=1.0,
                   width=WIDTH, height=HEIGHT, latents=torch.from_numpy(inputs["latents"].copy()), output_type="np")
    return np.asarray(out.images[0], dtype=np.float32)


def _ort_edit(art: Path, inputs: dict) -> np.ndarray:
    from uniref_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline.from_artifacts(art, backend="ort", condition_image_area=56 * 56)
    try:
        return pipe(inputs["prompt"], image=inputs["image"], num_inference_steps=STEPS, true_cfg_scale=1.0,
                    budget=AREA, policy="per-image", width=WIDTH, height=HEIGHT, latents=inputs["latents"].copy(),
                    output_type="np")
    finally:
        pipe.close()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_lora_matches_diffusers_fused(fmt, factors, lora_dir, tiny_model_dir, tmp_path):
    lora = write_lora(factors, lora_dir / f"{fmt}.safetensors", fmt)
    art = tmp_path / "art"
    assert main(["export", str(tiny_model_dir), "--out", str(art), *EXPORT_FLAGS, "--lora", f"{lora}:{SCALE}"]) == 0
    inputs = _edit_inputs(int(json.loads((tiny_model_dir / "vae" / "config.json").read_text())["z_dim"]))

    expected = _diffusers_edit(tiny_model_dir, lora, inputs)
    got = _ort_edit(art, inputs)
    diff = float(np.abs(got - expected).max())
    assert diff <= TOLERANCE, f"{fmt}: max abs diff {diff:.3g} vs diffusers with the LoRA fused at {SCALE}"
    without = _diffusers_edit(tiny_model_dir, None, inputs)
    # without the LoRA the parity check above would fail: the test can see a LoRA that was not fused
    assert float(np.abs(without - expected).max()) > 2 * TOLERANCE, "the LoRA barely moves the image: test is blind"

    record = next(s for s in json.loads((art / "manifest.json").read_text())["stages"] if s["stage"] == "export")
    assert record["settings"]["loras"] == [{"file": lora.name, "sha256": hashlib.sha256(lora.read_bytes()).hexdigest(),
                                            "scale": SCALE}]
    assert (art / "lora" / "base.safetensors").is_file()


# --- bad input: one line, exit 2, artifacts unchanged -----------------------------------------------------------


def _snapshot(art: Path) -> dict[str, bytes]:
    """Every file's bytes, except the write lock's (runtime/locking.py keeps that empty file once taken)."""
    return {str(p.relative_to(art)): p.read_bytes() for p in sorted(art.rglob("*"))
            if p.is_file() and p.name != ".uniref.lock"}


@pytest.fixture
def existing_art(tmp_path: Path) -> Path:
    art = tmp_path / "art"
    (art / "onnx").mkdir(parents=True)
    (art / "manifest.json").write_text('{"placeholder": true}\n')
    (art / "onnx" / "dit.onnx").write_bytes(b"graph")
    return art


def _other_model_lora(path: Path) -> Path:
    from safetensors.torch import save_file

    # a Flux-style LoRA: single-stream blocks Qwen-Image does not have
    save_file({f"transformer.single_transformer_blocks.{i}.attn.to_q.lora_A.weight": torch.zeros(4, 16)
               for i in range(4)} | {f"transformer.single_transformer_blocks.{i}.attn.to_q.lora_B.weight":
                                     torch.zeros(16, 4) for i in range(4)}, str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("lean", [False, True], ids=["regular", "lean"])
@pytest.mark.parametrize("case", ["other-model", "corrupt", "nan-scale", "inf-scale", "text-scale"])
def test_bad_lora_input_is_one_line_exit_2(case, lean, tiny_model_dir, existing_art, tmp_path, capsys, factors):
    good = write_lora(factors, tmp_path / "good.safetensors", "peft")
    arg = {
        "other-model": str(_other_model_lora(tmp_path / "flux.safetensors")),
        "corrupt": str(_corrupt(good, tmp_path / "corrupt.safetensors")),
        "nan-scale": f"{good}:nan",
        "inf-scale": f"{good}:inf",
        "text-scale": f"{good}:strong",
    }[case]
    before = _snapshot(existing_art)
    flags = [*EXPORT_FLAGS, *(["--lean"] if lean else [])]
    code = main(["export", str(tiny_model_dir), "--out", str(existing_art), *flags, "--lora", arg])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]  # progress lines precede it
    assert code == 2
    assert len(errors) == 1 and "LoRA" in errors[0] and stderr.strip().endswith(errors[0]), stderr
    assert "Traceback" not in stderr
    assert _snapshot(existing_art) == before
    if case == "other-model":
        assert "single_transformer_blocks" in errors[0]


def _corrupt(good: Path, path: Path) -> Path:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated download
    return path


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_lora_spec_rejects_non_finite_scale(tmp_path, scale):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"")
    with pytest.raises(InputError, match="finite"):
        LoraSpec.parse(f"{f}:{scale}")
    assert not math.isfinite(float(scale))


def test_lora_spec_parses_scale_and_plain_file(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"")
    assert LoraSpec.parse(f"{f}:0.7") == LoraSpec(f, 0.7)
    assert LoraSpec.parse(str(f)) == LoraSpec(f, 1.0)
    with pytest.raises(InputError, match="does not exist"):
        LoraSpec.parse(str(tmp_path / "missing.safetensors:0.5"))


# --- swap without re-tracing (`uniref-deploy lora`) -------------------------------------------------------------


@pytest.mark.slow
def test_swap_gives_the_pixels_of_a_fresh_export(factors, lora_dir, tiny_model_dir, tmp_path, capsys):
    first = write_lora(factors, lora_dir / "swap-first.safetensors", "peft")
    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer")
    second = write_lora(lora_factors(transformer, seed=7, strength=3.0), lora_dir / "swap-second.safetensors", "kohya")
    swapped, fresh = tmp_path / "swapped", tmp_path / "fresh"
    assert main(["export", str(tiny_model_dir), "--out", str(swapped), *EXPORT_FLAGS, "--lora", f"{first}:{SCALE}"]) == 0
    assert main(["export", str(tiny_model_dir), "--out", str(fresh), *EXPORT_FLAGS, "--lora", f"{second}:0.5"]) == 0
    inputs = _edit_inputs(int(json.loads((tiny_model_dir / "vae" / "config.json").read_text())["z_dim"]))
    before = _ort_edit(swapped, inputs)

    bad = _other_model_lora(tmp_path / "flux.safetensors")
    snapshot = _snapshot(swapped)
    capsys.readouterr()
    assert main(["lora", str(swapped), "--lora", str(bad)]) == 2
    assert [line.startswith("error: ") for line in capsys.readouterr().err.strip().splitlines()] == [True]
    assert _snapshot(swapped) == snapshot, "a rejected swap changed the artifact"

    assert main(["lora", str(swapped), "--lora", f"{second}:0.5"]) == 0
    got, expected = _ort_edit(swapped, inputs), _ort_edit(fresh, inputs)
    assert float(np.abs(got - expected).max()) <= 1e-6, "swapped artifact differs from a fresh export"
    assert float(np.abs(before - expected).max()) > 2 * TOLERANCE, "the two LoRAs give the same image: test is blind"
    from uniref_deploy.runtime.manifest import Manifest

    Manifest.load(swapped).verify_files(swapped)  # hashes were updated

    assert main(["lora", str(swapped), "--clear"]) == 0
    assert not (swapped / "lora" / "base.safetensors").exists()
    plain = _diffusers_edit(tiny_model_dir, None, inputs)
    assert float(np.abs(_ort_edit(swapped, inputs) - plain).max()) <= TOLERANCE, "--clear did not restore the base"


# --- the lean (streamed) export fuses LoRAs per layer -----------------------------------------------------------


def _dit_weights(art: Path) -> dict[str, np.ndarray]:
    """Module -> weight [out, in] of every linear layer found in the fp32 DiT graph (through ``lora/index.json``)."""
    import onnx
    from onnx import numpy_helper

    index = json.loads((art / "lora" / "index.json").read_text())["onnx/dit.onnx"]
    inits = {t.name: t for t in onnx.load(str(art / "onnx" / "dit.onnx")).graph.initializer}
    out = {}
    for module, (name, transposed, _shape) in index.items():
        if name is not None:
            arr = numpy_helper.to_array(inits[name])
            out[module] = arr.T if transposed else arr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("consume", [False, True], ids=["keep-shards", "consume-shards"])
def test_lean_lora_export_equals_the_regular_one(consume, factors, lora_dir, tiny_model_dir, tmp_path):
    import shutil

    lora = write_lora(factors, lora_dir / "lean-kohya.safetensors", "kohya")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    regular, lean = tmp_path / "regular", tmp_path / "lean"
    assert main(["export", str(model), "--out", str(regular), *EXPORT_FLAGS, "--lora", f"{lora}:{SCALE}"]) == 0
    flags = ["--lean", "--dtypes", "fp32", "--no-validate", "--no-ort-fusions", "--lora", f"{lora}:{SCALE}"]
    assert main(["export", str(model), "--out", str(lean), *flags, *(["--consume-shards"] if consume else [])]) == 0
    assert not list((model / "transformer").glob("*.safetensors")) if consume else True

    want, got = _dit_weights(regular), _dit_weights(lean)
    assert set(got) == set(want)
    different = [m for m in want if not np.array_equal(got[m], want[m])]
    assert not different, f"lean weights differ from the regular export's in {different[:3]}"
    base = {k.removesuffix(".weight"): v.numpy() for k, v in
            QwenImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer").state_dict().items()}
    fused = [m for m in factors if m in want]
    assert fused and all(not np.array_equal(want[m], base[m]) for m in fused), "LoRA not fused: test is blind"

    inputs = _edit_inputs(int(json.loads((tiny_model_dir / "vae" / "config.json").read_text())["z_dim"]))
    diff = float(np.abs(_ort_edit(lean, inputs) - _ort_edit(regular, inputs)).max())
    assert diff <= 1e-6, f"lean edit differs from the regular export's by {diff:.3g}"
    record = next(s for s in json.loads((lean / "manifest.json").read_text())["stages"] if s["stage"] == "export")
    assert record["settings"]["lean"] and record["settings"]["loras"][0]["scale"] == SCALE

    # `uniref-deploy lora` on the lean artifact: bases from the checkpoint (gone when the shards were consumed)
    second = write_lora(lora_factors(QwenImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer"),
                                     seed=7, strength=3.0), lora_dir / "lean-second.safetensors", "peft")
    if consume:
        snapshot = _snapshot(lean)
        assert main(["lora", str(lean), "--lora", f"{second}:0.5"]) == 2
        assert _snapshot(lean) == snapshot, "a refused swap changed the artifact"
        return
    assert main(["lora", str(lean), "--lora", f"{second}:0.5"]) == 0
    fresh = tmp_path / "fresh"
    assert main(["export", str(model), "--out", str(fresh), *EXPORT_FLAGS, "--lora", f"{second}:0.5"]) == 0
    got, want = _dit_weights(lean), _dit_weights(fresh)
    different = [m for m in want if not np.array_equal(got[m], want[m])]
    assert not different, f"swapped lean weights differ from a fresh export's in {different[:3]}"
    from uniref_deploy.runtime.manifest import Manifest

    Manifest.load(lean).verify_files(lean)  # hashes were updated
    assert main(["lora", str(lean), "--clear"]) == 0
    got = _dit_weights(lean)
    assert all(np.array_equal(got[m], base[m]) for m in got), "--clear did not restore the checkpoint's weights"
