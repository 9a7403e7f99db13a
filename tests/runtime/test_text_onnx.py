"""``CompiledPromptEncoder`` (host lookup, scatter, positions, template drop, cache, checks) with graph runners that
are transformers' own Qwen2.5-VL modules fed the host inputs, against transformers' full forward.

The exported ONNX graphs themselves run in ``test_text_artifacts.py``; here the runners consume the host tensors
(window order and window/image blocks from the masks, the M-RoPE tables in place of the model's own), so a wrong
host tensor changes the result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from uniref_deploy.runtime.errors import InputError  # noqa: E402
from uniref_deploy.runtime.images import image_digest  # noqa: E402
from uniref_deploy.runtime.pipeline_classes import EDIT_PLUS, PIPELINE_CLASSES  # noqa: E402
from uniref_deploy.runtime.text import QwenPromptEncoder, condition_images  # noqa: E402
from uniref_deploy.runtime.text_host import TextHost  # noqa: E402
from uniref_deploy.runtime.text_onnx import CompiledPromptEncoder  # noqa: E402

PLUS = PIPELINE_CLASSES[EDIT_PLUS]
SIZES = [(64, 96), (700, 33), (384, 384)]


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES[:count]]


def _blocks(mask: np.ndarray) -> list[int]:
    """cu_seqlens of a block-diagonal additive mask [1, 1, N, N]."""
    m = mask[0, 0]
    starts = [i for i in range(1, len(m)) if m[i, i - 1] != 0.0]
    return [0, *starts, len(m)]


class TorchRunners:
    """The two graphs' contracts served by transformers' modules (counts calls)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def vision(self, feeds):
        self.calls.append("vision")
        visual = self.model.model.visual
        n = feeds["pixel_patches"].shape[0]
        full = _blocks(feeds["full_mask"])
        grids = torch.tensor([[1, *self._grid(full[i + 1] - full[i], feeds)] for i in range(len(full) - 1)])
        with torch.no_grad():
            out = visual(torch.from_numpy(feeds["pixel_patches"]), grid_thw=grids,
                         window_index=torch.from_numpy(feeds["window_index"]),
                         cu_window_seqlens=torch.tensor(_blocks(feeds["window_mask"]), dtype=torch.int32),
                         cu_seqlens=torch.tensor(full, dtype=torch.int32))
        assert out.pooler_output.shape[0] == n // 4
        return {"image_embeds": out.pooler_output.numpy()}

    def _grid(self, patches: int, feeds) -> tuple[int, int]:
        h, w = self.shapes.pop(0)
        assert h * w == patches  # the full mask's blocks are the images
        return h, w

    def encoder(self, feeds):
        self.calls.append("encoder")
        lm = self.model.model.language_model
        tables = (torch.from_numpy(feeds["rope_cos"]), torch.from_numpy(feeds["rope_sin"]))
        original = lm.rotary_emb.forward
        lm.rotary_emb.forward = lambda x, position_ids: tables
        try:
            with torch.no_grad():
                out = lm(inputs_embeds=torch.from_numpy(feeds["inputs_embeds"]))
        finally:
            lm.rotary_emb.forward = original
        return {"last_hidden_state": out.last_hidden_state.numpy()}


@pytest.fixture(scope="module")
def tiny_te(tiny_model_dir: Path):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir / "text_encoder").eval()
    table = model.model.language_model.embed_tokens.weight.detach().numpy()
    return tiny_model_dir, model, table


def _encoder(tiny_te, positions: str = "mrope", **kwargs) -> tuple[CompiledPromptEncoder, TorchRunners]:
    folder, model, table = tiny_te
    runners = TorchRunners(model)
    host = TextHost.from_dir(folder, positions)
    enc = CompiledPromptEncoder(host, table, runners.vision, runners.encoder, **kwargs)
    original = enc._host_inputs

    def with_shapes(*args):  # tell the torch vision runner each image's (h, w) grid
        prepared = original(*args)
        runners.shapes = [tuple(int(v) for v in g[1:]) for g in prepared.grids]
        return prepared

    enc._host_inputs = with_shapes
    return enc, runners


def _transformers_embeds(tiny_te, prompt: str, images, mm_token_types: bool) -> np.ndarray:
    folder, model, _ = tiny_te
    processor = transformers.AutoProcessor.from_pretrained(folder / "processor")
    cond = condition_images(images)
    inputs = processor(text=[PLUS.format_prompt(prompt, len(images))], images=cond or None, return_tensors="pt")
    if not mm_token_types:
        inputs.pop("mm_token_type_ids")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
    return hidden[0, PLUS.drop_tokens:].numpy()[None]


@pytest.mark.parametrize("count", [0, 1, 3])
def test_matches_transformers_forward(tiny_te, count):
    """3-D positions (transformers with the processor's mm_token_type_ids) and sequential positions (transformers
    without them, as diffusers' pipelines call it) both within 1e-4 of scale."""
    images = _images(count)
    prompt = "把猫变成狗 🐱➡️🐶"
    for mode, mm in (("mrope", True), ("sequential", False)):
        enc, _ = _encoder(tiny_te, mode)
        embeds, mask = enc.encode(prompt, images)
        want = _transformers_embeds(tiny_te, prompt, images, mm)
        assert embeds.shape == want.shape and mask.all() and mask.shape == embeds.shape[:2]
        assert np.abs(embeds - want).max() <= 1e-4 * np.abs(want).max(), mode
    if count:  # the two position modes really differ once images are in the sequence
        assert np.abs(_transformers_embeds(tiny_te, prompt, images, True)
                      - _transformers_embeds(tiny_te, prompt, images, False)).max() > 1e-3


def test_same_as_the_transformers_fallback(tiny_te):
    """Sequential mode reproduces ``QwenPromptEncoder`` (the transformers path artifacts without text graphs use)."""
    folder = tiny_te[0]
    images = _images(2)
    enc, _ = _encoder(tiny_te, "sequential")
    want = QwenPromptEncoder(folder, dtype="float32").encode("edit", images)[0]
    got = enc.encode("edit", images)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_cache_is_by_content(tiny_te):
    enc, runners = _encoder(tiny_te)
    images = _images(2)
    first = enc.encode("p", images)
    copies = [im.copy() for im in images]
    again = enc.encode("p", copies, image_keys=[image_digest(im) for im in copies])
    assert again[0] is first[0] and runners.calls == ["vision", "encoder"]
    changed = images[1].copy()
    changed.putpixel((0, 0), (1, 2, 3))
    enc.encode("p", [images[0], changed])
    assert runners.calls.count("encoder") == 2


def test_limits_refused_before_any_graph_runs(tiny_te):
    enc, runners = _encoder(tiny_te, vision_max_patches=100, max_text_len=120)
    with pytest.raises(InputError, match="vision patches, over the 100"):
        enc.check("p", _images(3))
    with pytest.raises(InputError, match="over the 120"):
        enc.encode("word " * 60, [])
    with pytest.raises(InputError, match="aspect over 200:1"):
        enc.encode("p", [Image.new("RGB", (3000, 10))])
    assert runners.calls == []
