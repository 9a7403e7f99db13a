"""Request-level checks of ``runtime.pipeline.Pipeline`` on the tiny preset: reference count, output size, prompt
length. Every rejection is a one-line ``InputError`` raised before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from uniref_deploy.runtime.errors import InputError, PackingError  # noqa: E402
from uniref_deploy.runtime.packing import max_references  # noqa: E402
from uniref_deploy.runtime.pipeline import Pipeline  # noqa: E402
from uniref_deploy.runtime.text import MAX_TEXT_TOKENS  # noqa: E402

PROMPT = "make it blue"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    pipe = Pipeline.from_pretrained(tiny_model_dir)
    yield pipe
    pipe.close()


def _small_image(seed: int = 0, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.slow  # torch pipeline on the tiny preset
def test_zero_references_is_plain_generation(pipe):
    out = pipe(PROMPT, image=[], width=48, height=32, num_inference_steps=2, seed=0)
    assert isinstance(out, Image.Image)
    assert out.size == (48, 32)
    assert pipe.last_layout.references == ()
    assert pipe.last_layout.num_image_tokens == (48 // 16) * (32 // 16)
    assert np.asarray(out).std() > 0


@pytest.mark.slow  # torch pipeline on the tiny preset
@pytest.mark.parametrize("size", [{}, {"width": 64}, {"height": 64}], ids=["none", "width-only", "height-only"])
@pytest.mark.parametrize("images", [None, []], ids=["None", "empty"])
def test_zero_references_need_width_and_height(pipe, images, size):
    with pytest.raises(PackingError) as excinfo:
        pipe(PROMPT, image=images, num_inference_steps=2, **size)
    assert "pass width and height" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


@pytest.mark.slow  # torch pipeline on the tiny preset
def test_more_references_than_the_budget_holds(pipe):
    """17 references at 1024^2 under the default policy: each would need 256x256 px, the budget holds 16."""
    assert max_references(1024) == 16
    refs = [_small_image(i) for i in range(17)]
    with pytest.raises(PackingError) as excinfo:
        pipe(PROMPT, image=refs, budget=1024, num_inference_steps=2)
    message = str(excinfo.value)
    assert "17 references" in message and "at most 16" in message and "\n" not in message


@pytest.mark.slow  # torch pipeline on the tiny preset
def test_prompt_over_the_text_limit(pipe):
    long_prompt = " ".join(["make it blue"] * 400)
    with pytest.raises(InputError) as excinfo:
        pipe(long_prompt, image=[_small_image()], width=32, height=32, num_inference_steps=2)
    message = str(excinfo.value)
    assert f"over the limit of {MAX_TEXT_TOKENS}" in message and "\n" not in message


@pytest.mark.slow  # torch pipeline on the tiny preset
def test_prompt_embeds_over_the_text_limit(pipe):
    embeds = np.zeros((1, MAX_TEXT_TOKENS + 1, pipe.config.text_hidden_size), np.float32)
    with pytest.raises(InputError, match="over the limit"):
        pipe(prompt_embeds=embeds, image=[], width=32, height=32, num_inference_steps=2)


def test_trim_text_padding_drops_only_trailing_masked_tokens() -> None:
    from uniref_deploy.runtime.pipeline import trim_text_padding

    embeds = np.arange(6 * 2, dtype=np.float32).reshape(1, 6, 2)
    mask = np.array([[True, False, True, True, False, False]])
    kept, kept_mask = trim_text_padding(embeds, mask)
    np.testing.assert_array_equal(kept, embeds[:, :4])
    np.testing.assert_array_equal(kept_mask, [[True, False, True, True]])  # an inner hole stays (positions)
    full = np.ones((1, 6), bool)
    assert trim_text_padding(embeds, full)[0].shape == (1, 6, 2)
    with pytest.raises(InputError, match="masks every token"):
        trim_text_padding(embeds, np.zeros((1, 6), bool))
