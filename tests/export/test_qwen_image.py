"""Tests for export/qwen_image.py: the exportable DiT wrapper against diffusers' own transformer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from uniref_deploy.export.qwen_image import QwenImageDitForExport, key_padding_bias  # noqa: E402
from uniref_deploy.export.samples import dit_sample  # noqa: E402
from uniref_deploy.runtime.backends.torch_ref import TorchDitBackend  # noqa: E402
from uniref_deploy.runtime.manifest import ModelConfig  # noqa: E402
from uniref_deploy.runtime.packing import pack_references  # noqa: E402


def test_key_padding_bias_keeps_scores_and_zeroes_padding() -> None:
    mask = torch.tensor([[True, True, False], [True, True, True]])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        bias = key_padding_bias(mask, 4, dtype)
        assert bias.shape == (2, 1, 1, 7) and bias.dtype == dtype
        assert torch.all(bias[1] == 0) and torch.all(bias[0, ..., [0, 1, 3, 4, 5, 6]] == 0)
        assert bias[0, 0, 0, 2] == torch.finfo(dtype).min
        scores = torch.randn(2, 2, 7, 7, dtype=torch.float32).to(dtype) * 30
        weights = torch.softmax((scores + bias).float(), dim=-1)
        assert torch.all(weights[0, ..., 2] == 0)  # padded key: exactly no weight
        assert torch.equal(torch.softmax(scores[1].float() + bias[1].float(), -1), torch.softmax(scores[1].float(), -1))


def _wrapper_and_reference(model_dir: Path) -> tuple[QwenImageDitForExport, TorchDitBackend, ModelConfig]:
    import diffusers

    config = ModelConfig.from_diffusers_dir(model_dir)
    transformer = diffusers.QwenImageTransformer2DModel.from_pretrained(model_dir / "transformer").eval()
    return QwenImageDitForExport(transformer).eval(), TorchDitBackend(config, model_dir), config


@pytest.mark.slow  # tiny preset through diffusers
@pytest.mark.parametrize(("pad", "batch"), [(0, 1), (3, 2)])
def test_wrapper_equals_diffusers_transformer(tiny_model_dir: Path, pad: int, batch: int) -> None:
    """The exported module (additive key bias, real RoPE) computes diffusers' transformer, padded text included."""
    wrapper, reference, config = _wrapper_and_reference(tiny_model_dir)
    layout = pack_references([(96, 64), (40, 120)], 128 * 96, policy="per-image", width=64, height=48)
    feeds = dit_sample(config, layout, 11, pad=pad, batch=batch, seed=3).feeds
    names = [s.name for s in reference.inputs if s.name in feeds]
    with torch.no_grad():
        ours = wrapper(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
    with reference:
        theirs = reference.infer(feeds)["velocity"]
    scale = float(np.abs(theirs).max())
    assert np.abs(ours - theirs).max() <= 1e-5 * scale


@pytest.mark.parametrize("batch", [1, 2])
def test_zero_cond_wrapper_equals_diffusers_transformer(tiny_zero_cond_model_dir: Path, batch: int) -> None:
    """Edit-2511's per-token modulation (t on target tokens, zero t on references) at batch 1 and 2."""
    wrapper, reference, config = _wrapper_and_reference(tiny_zero_cond_model_dir)
    assert config.zero_cond_t and wrapper.zero_cond_t
    layout = pack_references([(96, 64), (40, 120)], 128 * 96, policy="per-image", width=64, height=48)
    feeds = dit_sample(config, layout, 11, batch=batch, seed=4).feeds
    index = feeds["modulate_index"]
    assert 0 < index.sum() < index.size  # both target and reference tokens
    with torch.no_grad():
        ours = wrapper(*(torch.from_numpy(feeds[s.name]) for s in reference.inputs)).numpy()
    with reference:
        theirs = reference.infer(feeds)["velocity"]
        plain = reference.infer({**feeds, "modulate_index": np.zeros_like(index)})["velocity"]
    scale = float(np.abs(theirs).max())
    assert ours.shape == (batch, layout.num_image_tokens, 16)
    assert np.abs(ours - theirs).max() <= 1e-5 * scale
    assert np.abs(plain - theirs).max() > 100 * 1e-5 * scale  # the index matters: this test can see a wrong one
