"""Every argument of ``Pipeline.__call__`` is checked before any model runs (issue 12): a bad one is a one-line
``InputError``; a single image or path is one reference; over random argument mixes only ``UnirefError``s escape."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from uniref_deploy.runtime.errors import InputError, UnirefError  # noqa: E402
from uniref_deploy.runtime.images import check_output_path, output_format  # noqa: E402
from uniref_deploy.runtime.pipeline import Pipeline  # noqa: E402
from uniref_deploy.runtime.text import condition_images  # noqa: E402

KW = dict(num_inference_steps=1, width=32, height=32, seed=0, output_type="np")


class Counting:
    """Wraps a backend and counts its ``infer`` calls."""

    def __init__(self, backend):
        self.backend, self.calls = backend, 0

    def infer(self, feeds):
        self.calls += 1
        return self.backend.infer(feeds)

    def deactivate(self):
        self.backend.deactivate()


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = Pipeline.from_pretrained(tiny_model_dir)
    pipe.backends = {k: Counting(b) for k, b in pipe.backends.items()}
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def embeds(pipe) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 4, pipe.config.text_hidden_size)).astype(np.float32)


@pytest.fixture
def image_path(tmp_path) -> str:
    path = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


def _calls(pipe) -> int:
    return sum(b.calls for b in pipe.backends.values())


BAD = {
    "negative seed": {"seed": -1},
    "float seed": {"seed": 1.5},
    "image [123]": {"image": [123]},
    "image [None]": {"image": [None]},
    "image 123": {"image": 123},
    "width 64.5": {"width": 64.5},
    "width '64'": {"width": "64"},
    "cfg '4'": {"true_cfg_scale": "4"},
    "cfg inf": {"true_cfg_scale": float("inf"), "negative_prompt_embeds": "EMBEDS"},
    "cfg nan": {"true_cfg_scale": float("nan"), "negative_prompt_embeds": "EMBEDS"},
    "latents [[0.0]]": {"latents": [[0.0]]},
    "latents wrong shape": {"latents": np.zeros((1, 3, 64), np.float32)},
    "mask wrong shape": {"prompt_embeds_mask": np.ones((1, 3), bool)},
    "mask without embeds": {"negative_prompt_embeds_mask": np.ones((1, 4), bool)},
    "embeds nan": {"prompt_embeds": np.full((1, 4, 16), np.nan, np.float32)},
    "steps True": {"num_inference_steps": True},
    "policy list": {"policy": ["self"]},
    "callback 3": {"callback": 3},
    "1000x1 reference": {"image": [np.zeros((1, 1000, 3), np.uint8)]},
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_argument_is_input_error_before_any_model(pipe, embeds, image_path, name):
    kwargs = {**KW, "prompt_embeds": embeds, "image": [image_path], **BAD[name]}
    kwargs = {k: embeds if isinstance(v, str) and v == "EMBEDS" else v for k, v in kwargs.items()}
    before = _calls(pipe)
    with pytest.raises(InputError) as info:
        pipe(**kwargs)
    assert "\n" not in str(info.value)
    assert _calls(pipe) == before, "a model ran before the argument was refused"


@pytest.mark.parametrize("single", ["path", "pil", "array"])
def test_a_single_image_is_one_reference(pipe, embeds, image_path, single):
    image = {"path": image_path, "pil": Image.open(image_path), "array": np.asarray(Image.open(image_path))}[single]
    out = pipe(prompt_embeds=embeds, image=image, **KW)
    assert len(pipe.last_layout.references) == 1
    np.testing.assert_array_equal(out, pipe(prompt_embeds=embeds, image=[image_path], **KW))


def test_condition_resize_never_has_a_zero_side():
    """The text encoder's condition resize of the thinnest accepted reference, even at a tiny area."""
    for area in (384 * 384, 64 * 64):
        (img,) = condition_images([Image.new("RGB", (512, 1))], area)
        assert min(img.size) >= 32


def test_output_format_follows_the_extension(tmp_path):
    assert [output_format(f"x{e}") for e in (".png", ".JPG", ".jpeg", ".webp")] == ["PNG", "JPEG", "JPEG", "WEBP"]
    (tmp_path / "file").write_text("x")
    for bad in ("out.tiff2", "out", str(tmp_path / "file" / "o.png"), str(tmp_path / "file" / "sub" / "o.png"),
                str(tmp_path)):
        with pytest.raises(InputError):
            check_output_path(bad)
    assert check_output_path(tmp_path / "new" / "o.png") == "PNG" and (tmp_path / "new").is_dir()  # created


# ---- only UnirefError escapes ------------------------------------------------------------------------------------

ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                st.text(max_size=5), st.lists(st.integers(), max_size=2), st.just(np.zeros((2, 2))))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_only_uniref_errors_escape(pipe, embeds, image_path, data):
    """Random mixes of valid and invalid values for every argument: the call returns or raises a UnirefError."""
    d = pipe.config.text_hidden_size
    choices = {
        "image": st.one_of(st.just([image_path]), st.just(image_path), st.just([]), st.just(None), ANY,
                           st.lists(st.sampled_from([image_path, 1, None, "missing.png"]), max_size=3)),
        "seed": st.one_of(st.integers(0, 2**32), ANY),
        "width": st.one_of(st.sampled_from([None, 32, 48]), ANY),
        "height": st.one_of(st.sampled_from([None, 32, 16]), ANY),
        "true_cfg_scale": st.one_of(st.floats(0, 8), ANY),
        "num_inference_steps": st.one_of(st.integers(1, 2), ANY),
        "budget": st.one_of(st.sampled_from([1024, 64 * 64]), ANY),
        "policy": st.one_of(st.sampled_from(["self", "per-image"]), ANY),
        "output_type": st.one_of(st.sampled_from(["np", "latent"]), ANY),
        "prompt_embeds": st.one_of(st.just(embeds), st.just(embeds[0]), ANY,
                                   st.just(np.zeros((1, 2, d + 1), np.float32))),
        "prompt_embeds_mask": st.one_of(st.none(), st.just(np.ones((1, 4), bool)), ANY),
        "negative_prompt_embeds": st.one_of(st.none(), st.just(embeds), ANY),
        "latents": st.one_of(st.none(), ANY, st.just(np.zeros((1, 4, 64), np.float32))),
    }
    kwargs = {k: data.draw(s, label=k) for k, s in choices.items() if data.draw(st.booleans(), label=f"use {k}")}
    kwargs.setdefault("prompt_embeds", embeds)
    steps = kwargs.get("num_inference_steps", 1)
    if type(steps) is int and steps > 2:  # keep accepted calls quick
        kwargs["num_inference_steps"] = 2
    kwargs.setdefault("num_inference_steps", 1)
    try:
        out = pipe(**kwargs)
    except UnirefError as err:
        assert "\n" not in str(err)
        return
    assert np.isfinite(np.asarray(out, dtype=np.float32)).all()
