"""Parity of ``runtime.pipeline.Pipeline`` with diffusers' ``QwenImageEditPipeline`` (Qwen-Image-Edit's class).

Both load the ``tiny`` preset written with ``model_index.json`` class ``QwenImageEditPipeline``; ours serves it
with that class's template (one unlabelled vision block), one reference, and the condition image at the
reference's VAE size. diffusers' ``__call__`` sizes the reference with ``calculate_dimensions(1024 * 1024, ...)``;
to stay fast on CPU that module function is wrapped so the hard-coded 1024² area becomes ``VAE_AREA`` (the
wrapper passes every other area through). Ours gets ``budget=VAE_AREA`` and the same explicit output size.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import QwenImageEditPipeline  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit  # noqa: E402
from PIL import Image  # noqa: E402

from uniref_deploy.runtime.errors import InputError  # noqa: E402
from uniref_deploy.runtime.pipeline import Pipeline  # noqa: E402
from uniref_deploy.runtime.pipeline_classes import EDIT, EDIT_PLUS  # noqa: E402

VAE_AREA = 64 * 64  # stands in for the 1024² area hard-coded in QwenImageEditPipeline.__call__
WIDTH, HEIGHT = 64, 48
STEPS = 2
CFG_SCALE = 4.0
PROMPT = "Change the background to a beach at sunset."
NEGATIVE = "make it blue"
TOLERANCE = 2.0 / 255.0
TIGHT_TOLERANCE = 1e-4  # measured ~1e-6; see test_pipeline_parity.py for why the tight bound matters


@pytest.fixture(scope="module")
def small_area():
    original = edit.calculate_dimensions

    def shrunk(target_area, ratio):
        return original(VAE_AREA if target_area == 1024 * 1024 else target_area, ratio)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(edit, "calculate_dimensions", shrunk)
        yield


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_edit_model_dir, small_area) -> QwenImageEditPipeline:
    pipe = QwenImageEditPipeline.from_pretrained(tiny_edit_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def our_pipe(tiny_edit_model_dir) -> Pipeline:
    pipe = Pipeline.from_pretrained(tiny_edit_model_dir, text_encoder_dtype="float32")
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def reference() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def initial_latents(our_pipe) -> np.ndarray:
    z = our_pipe.config.latent_channels
    return np.random.default_rng(1234).standard_normal((1, (HEIGHT // 16) * (WIDTH // 16), 4 * z), dtype=np.float32)


@pytest.fixture(scope="module")
def runs(diffusers_pipe, our_pipe, reference, initial_latents):
    cache: dict = {}

    def run(which: str, negative: str | None, prompt: str = PROMPT) -> np.ndarray:
        key = (which, negative, prompt)
        if key not in cache:
            kw = dict(prompt=prompt, negative_prompt=negative, true_cfg_scale=CFG_SCALE, num_inference_steps=STEPS,
                      width=WIDTH, height=HEIGHT, output_type="np")
            if which == "diffusers":
                out = diffusers_pipe(image=reference, latents=torch.from_numpy(initial_latents.copy()), **kw)
                cache[key] = np.asarray(out.images[0], dtype=np.float32)
            else:
                cache[key] = our_pipe(image=[reference], latents=initial_latents.copy(), budget=VAE_AREA,
                                      policy="per-image", **kw)
        return cache[key]

    return run


def test_folder_class_is_recorded(our_pipe):
    assert our_pipe.config.pipeline_class == EDIT
    assert our_pipe.text_encoder.pipeline.name == EDIT


@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no-cfg", "cfg"])
def test_edit_matches_diffusers(runs, negative):
    expected, got = runs("diffusers", negative), runs("ours", negative)
    assert got.shape == expected.shape == (HEIGHT, WIDTH, 3)
    diff = float(np.abs(got - expected).max())
    assert diff <= TOLERANCE, f"max abs diff {diff:.3g} vs QwenImageEditPipeline (cfg={negative is not None})"
    assert diff <= TIGHT_TOLERANCE, f"max abs diff {diff:.3g} vs QwenImageEditPipeline (tight bound)"
    assert float(expected.std()) > 1e-3


def test_prompt_embeddings_match_diffusers(diffusers_pipe, our_pipe, reference):
    w, h, _ = edit.calculate_dimensions(1024 * 1024, reference.width / reference.height)  # patched: VAE_AREA
    condition = diffusers_pipe.image_processor.resize(reference, h, w)
    with torch.inference_mode():
        expected, _ = diffusers_pipe.encode_prompt(PROMPT, image=condition, device="cpu")
    embeds, mask = our_pipe.text_encoder.encode(PROMPT, [reference], [(w, h)])
    assert embeds.shape == tuple(expected.shape) and mask.all()
    diff = float(np.abs(embeds - expected.float().numpy()).max())
    assert diff <= 1e-5, f"max abs diff {diff:.3g} vs diffusers' encode_prompt"


def test_edit_plus_template_would_differ(runs, tiny_edit_model_dir, reference, initial_latents):
    """Serving the same folder as Edit-Plus (its template, 384² condition) moves the output past the tight bound."""
    plus = Pipeline.from_pretrained(tiny_edit_model_dir, pipeline_class=EDIT_PLUS, text_encoder_dtype="float32")
    assert plus.config.pipeline_class == EDIT_PLUS
    got = plus(PROMPT, image=[reference], negative_prompt=NEGATIVE, true_cfg_scale=CFG_SCALE, num_inference_steps=STEPS,
               budget=VAE_AREA, policy="per-image", width=WIDTH, height=HEIGHT, latents=initial_latents.copy(),
               output_type="np")
    diff = float(np.abs(got - runs("diffusers", NEGATIVE)).max())
    assert diff > 10 * TIGHT_TOLERANCE, f"the Edit-Plus template moved the output only {diff:.3g}"


@pytest.mark.parametrize("count", [0, 2])
def test_reference_count_is_checked(our_pipe, reference, count):
    with pytest.raises(InputError, match="exactly 1 reference") as info:
        our_pipe(PROMPT, image=[reference] * count, num_inference_steps=1, width=WIDTH, height=HEIGHT,
                 budget=VAE_AREA)
    assert "\n" not in str(info.value)
