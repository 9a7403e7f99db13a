"""Parity of ``runtime.pipeline.Pipeline`` with diffusers' ``QwenImageEditPlusPipeline`` (the ground truth).

Both pipelines load the same ``tiny`` preset folder and get the same prompt, negative prompt, packed initial
latents, steps and ``true_cfg_scale``; ours runs the ``per-image`` policy, which sizes each reference as diffusers
does. The decoded images (``output_type="np"``) must agree to 2/255.

To stay fast on CPU, diffusers' module constants ``VAE_IMAGE_SIZE`` (1024^2, the per-reference VAE area) and
``CONDITION_IMAGE_SIZE`` (384^2, the per-reference vision-tower area) are monkeypatched to ``VAE_AREA`` and
``COND_AREA``, and the same areas are given to ours (``budget=VAE_AREA``, ``condition_image_area=COND_AREA``).
Both get an explicit ``width``/``height``, because diffusers' default output area is hard-coded to 1024^2 rather
than taken from ``VAE_IMAGE_SIZE``. Nothing else of either pipeline is replaced.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import QwenImageEditPlusPipeline  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus  # noqa: E402
from PIL import Image  # noqa: E402

from uniref_deploy.runtime import latents as lat  # noqa: E402
from uniref_deploy.runtime.pipeline import Pipeline, cfg_combine  # noqa: E402

VAE_AREA = 64 * 64  # stands in for diffusers' VAE_IMAGE_SIZE; our per-image budget
COND_AREA = 56 * 56  # stands in for diffusers' CONDITION_IMAGE_SIZE; our condition_image_area
WIDTH, HEIGHT = 64, 48  # explicit output size for both pipelines
STEPS = 2
CFG_SCALE = 4.0
PROMPT = "Put the person from picture 1 into the room from picture 2."
OTHER_PROMPT = "Make the sky red and the grass yellow."
NEGATIVE = "make it blue"
TOLERANCE = 2.0 / 255.0  # the parity requirement (one 8-bit level either way)
# Measured ~1e-6. On the tiny preset the prompt, the CFG branch or one reference more moves the image by only
# 0.006-0.026, about the size of TOLERANCE, so this tighter bound is what lets the test notice such a bug.
TIGHT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def small_sizes():
    """Module-wide monkeypatch of diffusers' per-reference resize areas (see the module docstring)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(edit_plus, "VAE_IMAGE_SIZE", VAE_AREA)
        mp.setattr(edit_plus, "CONDITION_IMAGE_SIZE", COND_AREA)
        yield


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_model_dir, small_sizes) -> QwenImageEditPlusPipeline:
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def our_pipe(tiny_model_dir) -> Pipeline:
    pipe = Pipeline.from_pretrained(tiny_model_dir, condition_image_area=COND_AREA, text_encoder_dtype="float32")
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def references() -> list[Image.Image]:
    """Three references of different aspect ratios: 120x80 noise, 60x100 gradient, 90x90 noise."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8))
    yy, xx = np.mgrid[0:100, 0:60]
    gradient = np.stack([xx * 255 // 59, yy * 255 // 99, (xx + yy) * 255 // 158], axis=-1).astype(np.uint8)
    square = Image.fromarray(rng.integers(0, 256, (90, 90, 3), dtype=np.uint8))
    return [noise, Image.fromarray(gradient), square]


@pytest.fixture(scope="module")
def initial_latents(our_pipe) -> np.ndarray:
    """Packed target noise [1, S_target, 4z] float32 from a seeded numpy generator."""
    z = our_pipe.config.latent_channels
    num_tokens = (HEIGHT // 16) * (WIDTH // 16)
    return np.random.default_rng(1234).standard_normal((1, num_tokens, 4 * z), dtype=np.float32)


@pytest.fixture(scope="module")
def run_diffusers(diffusers_pipe, references, initial_latents):
    cache: dict = {}

    def run(num_refs: int, negative: str | None, prompt: str = PROMPT) -> np.ndarray:
        key = (num_refs, negative, prompt)
        if key not in cache:
            out = diffusers_pipe(
                image=references[:num_refs],
                prompt=prompt,
                negative_prompt=negative,
                true_cfg_scale=CFG_SCALE,
                num_inference_steps=STEPS,
                width=WIDTH,
                height=HEIGHT,
                latents=torch.from_numpy(initial_latents.copy()),
                output_type="np",
            )
            cache[key] = np.asarray(out.images[0], dtype=np.float32)
        return cache[key]

    return run


@pytest.fixture(scope="module")
def run_ours(our_pipe, references, initial_latents):
    cache: dict = {}

    def run(num_refs: int, negative: str | None, prompt: str = PROMPT) -> np.ndarray:
        key = (num_refs, negative, prompt)
        if key not in cache:
            cache[key] = _our_edit(our_pipe, references[:num_refs], negative, prompt, initial_latents)
        return cache[key]

    return run


def _our_edit(pipe, refs, negative, prompt, initial_latents) -> np.ndarray:
    return pipe(
        prompt,
        image=refs,
        negative_prompt=negative,
        true_cfg_scale=CFG_SCALE,
        num_inference_steps=STEPS,
        budget=VAE_AREA,
        policy="per-image",
        width=WIDTH,
        height=HEIGHT,
        latents=initial_latents.copy(),
        output_type="np",
    )


# --- end to end ------------------------------------------------------------------------------------------------

CASES = [pytest.param(n, neg, id=f"{n}ref-{'cfg' if neg else 'no-cfg'}") for n in (1, 2, 3) for neg in (None, NEGATIVE)]


@pytest.mark.parametrize(("num_refs", "negative"), CASES)
def test_edit_matches_diffusers(run_diffusers, run_ours, num_refs, negative):
    expected = run_diffusers(num_refs, negative)
    got = run_ours(num_refs, negative)

    assert got.shape == expected.shape == (HEIGHT, WIDTH, 3)
    assert got.dtype == np.float32
    diff = float(np.abs(got - expected).max())
    assert diff <= TOLERANCE, f"max abs diff {diff:.3g} vs diffusers ({num_refs} refs, cfg={negative is not None})"
    assert float(expected.std()) > 1e-3, "diffusers' output is constant; the comparison would prove nothing"


@pytest.mark.parametrize(("num_refs", "negative"), CASES)
def test_edit_matches_diffusers_tightly(run_diffusers, run_ours, num_refs, negative):
    """Same runs (cached) against ``TIGHT_TOLERANCE``: the bound that can see a wrong prompt, CFG or reference."""
    diff = float(np.abs(run_ours(num_refs, negative) - run_diffusers(num_refs, negative)).max())
    assert diff <= TIGHT_TOLERANCE, f"max abs diff {diff:.3g} vs diffusers ({num_refs} refs, cfg={negative is not None})"


def test_parity_cases_are_distinguishable(run_diffusers):
    """Prompt, CFG branch, and each reference change the output far beyond ``TIGHT_TOLERANCE``."""
    base = run_diffusers(2, NEGATIVE)
    others = {
        "other prompt": run_diffusers(2, NEGATIVE, prompt=OTHER_PROMPT),
        "no cfg": run_diffusers(2, None),
        "one reference fewer": run_diffusers(1, NEGATIVE),
        "one reference more": run_diffusers(3, NEGATIVE),
    }
    for name, image in others.items():
        diff = float(np.abs(image - base).max())
        assert diff > 10 * TIGHT_TOLERANCE, f"{name}: output moved only {diff:.3g}; parity could not detect this"


# --- pieces ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "height", "width"), [(16, 6, 8), (4, 2, 2), (8, 10, 4)])
def test_pack_unpack_match_diffusers(channels, height, width):
    rng = np.random.default_rng(channels * 100 + height)
    latent = rng.standard_normal((2, channels, height, width), dtype=np.float32)

    packed = lat.pack(latent)
    expected = QwenImageEditPlusPipeline._pack_latents(torch.from_numpy(latent), 2, channels, height, width).numpy()
    np.testing.assert_array_equal(packed, expected)

    unpacked = lat.unpack(packed, height, width)
    # diffusers takes pixel sizes and returns a frame axis: [B, C, 1, H, W]
    expected_unpacked = QwenImageEditPlusPipeline._unpack_latents(
        torch.from_numpy(packed), height * 8, width * 8, vae_scale_factor=8
    ).numpy()
    np.testing.assert_array_equal(unpacked, expected_unpacked[:, :, 0])
    np.testing.assert_array_equal(unpacked, latent)


@pytest.mark.parametrize("scale", [1.5, 4.0, 7.5])
def test_cfg_combine_matches_diffusers_formula(scale):
    rng = np.random.default_rng(int(scale * 10))
    cond = rng.standard_normal((1, 12, 64), dtype=np.float32)
    uncond = rng.standard_normal((1, 12, 64), dtype=np.float32)

    got = cfg_combine(cond, uncond, scale)

    # diffusers' QwenImageEditPlusPipeline.__call__, true CFG branch
    noise_pred, neg_noise_pred = torch.from_numpy(cond), torch.from_numpy(uncond)
    comb_pred = neg_noise_pred + scale * (noise_pred - neg_noise_pred)
    cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
    noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
    expected = (comb_pred * (cond_norm / noise_norm)).numpy()

    assert got.dtype == np.float32 and got.shape == cond.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, cond, atol=1e-3), "guidance had no effect; the check would be vacuous"


@pytest.mark.parametrize("num_refs", [1, 3])
def test_prompt_embeddings_match_diffusers(diffusers_pipe, our_pipe, references, num_refs):
    refs = references[:num_refs]
    # diffusers' __call__ resizes each reference to CONDITION_IMAGE_SIZE (patched to COND_AREA) for the encoder
    condition = []
    for img in refs:
        w, h = edit_plus.calculate_dimensions(edit_plus.CONDITION_IMAGE_SIZE, img.width / img.height)
        condition.append(diffusers_pipe.image_processor.resize(img, h, w))
    with torch.inference_mode():
        expected, expected_mask = diffusers_pipe.encode_prompt(PROMPT, image=condition, device="cpu")

    embeds, mask = our_pipe.text_encoder.encode(PROMPT, refs)

    assert embeds.dtype == np.float32
    assert embeds.shape == tuple(expected.shape)
    assert expected_mask is None or bool(expected_mask.all())  # diffusers drops an all-ones mask
    assert mask.shape == embeds.shape[:2] and mask.all()
    diff = float(np.abs(embeds - expected.float().numpy()).max())
    assert diff <= 1e-5, f"max abs diff {diff:.3g} vs diffusers' encode_prompt"
    assert float(embeds.std()) > 1e-3
