"""Parity of runtime/rope.py with diffusers' QwenEmbedRope, apply_rotary_emb_qwen and zero_cond_t index."""

from __future__ import annotations

import numpy as np
import pytest

from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.rope import (
    RopeCache,
    RopeConfig,
    apply_rope,
    image_rope,
    modulation_index,
    text_rope,
)

torch = pytest.importorskip("torch")
qwen = pytest.importorskip("diffusers.models.transformers.transformer_qwenimage")

TOL = 1e-6
AXES = [(16, 56, 56), (8, 4, 4)]
LAYOUTS = [
    [(32, 48), (40, 40), (8, 128), (64, 16)],  # target + 3 references, non-square
    [(1, 1)],
    [(3, 5), (7, 2), (128, 128)],  # odd sides; a reference larger than the target
]


@pytest.fixture(scope="module", params=AXES, ids=lambda a: "x".join(map(str, a)))
def embed(request):
    axes = request.param
    return RopeConfig(axes_dim=axes), qwen.QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=True)


def _diffusers_tables(pos_embed, grids, text_len):
    # The transformer passes img_shapes (one list per batch item) and the text length.
    vid, txt = pos_embed(
        [[(1, h, w) for h, w in grids]], max_txt_seq_len=text_len, device=torch.device("cpu")
    )
    return vid.real.numpy(), vid.imag.numpy(), txt.real.numpy(), txt.imag.numpy()


def _maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.mark.parametrize("grids", LAYOUTS, ids=["multi-ref", "1x1", "odd"])
@pytest.mark.parametrize("text_len", [1, 77, 1024])
def test_tables_match_diffusers(embed, grids, text_len):
    config, pos_embed = embed
    ref_ic, ref_is, ref_tc, ref_ts = _diffusers_tables(pos_embed, grids, text_len)
    ic, is_ = image_rope(grids, config)
    tc, ts = text_rope(grids, text_len, config)
    n_img = sum(h * w for h, w in grids)
    assert ic.shape == is_.shape == (n_img, config.half_dim)
    assert tc.shape == ts.shape == (text_len, config.half_dim)
    assert {a.dtype for a in (ic, is_, tc, ts)} == {np.dtype(np.float32)}
    assert _maxdiff(ic, ref_ic) <= TOL
    assert _maxdiff(is_, ref_is) <= TOL
    assert _maxdiff(tc, ref_tc) <= TOL
    assert _maxdiff(ts, ref_ts) <= TOL


def test_unscaled_positions_match_diffusers():
    axes = (8, 4, 4)
    config = RopeConfig(axes_dim=axes, scale_rope=False)
    pos_embed = qwen.QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=False)
    grids = [(6, 9), (4, 4)]
    ref_ic, ref_is, ref_tc, ref_ts = _diffusers_tables(pos_embed, grids, 33)
    ic, is_ = image_rope(grids, config)
    tc, ts = text_rope(grids, 33, config)
    assert max(_maxdiff(ic, ref_ic), _maxdiff(is_, ref_is), _maxdiff(tc, ref_tc), _maxdiff(ts, ref_ts)) <= TOL


def test_transformer_forward_uses_same_tables_and_modulation_index():
    """Capture what a tiny zero_cond_t transformer hands its first block and compare."""
    torch.manual_seed(0)
    model = qwen.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
        zero_cond_t=True,
    ).eval()
    grids = [(4, 6), (2, 2), (3, 5)]
    text_len = 7
    captured = {}

    def grab(_module, _args, kwargs):
        captured.update(kwargs)

    model.transformer_blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    n_img = sum(h * w for h, w in grids)
    with torch.no_grad():
        model(
            hidden_states=torch.randn(1, n_img, 16),
            encoder_hidden_states=torch.randn(1, text_len, 16),
            encoder_hidden_states_mask=torch.ones(1, text_len, dtype=torch.long),
            timestep=torch.tensor([0.5]),
            img_shapes=[[(1, h, w) for h, w in grids]],
        )
    vid, txt = captured["image_rotary_emb"]
    config = RopeConfig.from_transformer_config(dict(model.config))
    tables = RopeCache(config).tables(grids, text_len)
    assert _maxdiff(tables["img_cos"], vid.real.numpy()) <= TOL
    assert _maxdiff(tables["img_sin"], vid.imag.numpy()) <= TOL
    assert _maxdiff(tables["txt_cos"], txt.real.numpy()) <= TOL
    assert _maxdiff(tables["txt_sin"], txt.imag.numpy()) <= TOL
    index = modulation_index(grids)
    assert index.dtype == np.int32
    np.testing.assert_array_equal(index, captured["modulate_index"].numpy()[0])


def test_modulation_index_layout():
    index = modulation_index([(2, 3), (1, 4), (2, 2)])
    np.testing.assert_array_equal(index, [0] * 6 + [1] * 8)
    np.testing.assert_array_equal(modulation_index([(2, 2)]), np.zeros(4, np.int32))


@pytest.mark.parametrize("axes", AXES)
def test_apply_rope_matches_diffusers(axes):
    config = RopeConfig(axes_dim=axes)
    grids = [(5, 7), (3, 4)]
    cos, sin = image_rope(grids, config)
    pos_embed = qwen.QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=True)
    freqs, _ = pos_embed([[(1, h, w) for h, w in grids]], max_txt_seq_len=1, device=torch.device("cpu"))
    x = torch.randn(1, cos.shape[0], 3, config.head_dim, generator=torch.Generator().manual_seed(1))
    ref = qwen.apply_rotary_emb_qwen(x, freqs, use_real=False).numpy()
    out = apply_rope(x.numpy(), cos, sin)
    assert out.dtype == np.float32
    assert _maxdiff(out, ref) <= TOL


def test_apply_rope_keeps_dtype_and_checks_shapes():
    cos, sin = image_rope([(2, 2)], RopeConfig(axes_dim=(8, 4, 4)))
    x = np.ones((4, 2, 16), np.float16)
    assert apply_rope(x, cos, sin).dtype == np.float16
    with pytest.raises(InputError):
        apply_rope(np.ones((5, 2, 16), np.float32), cos, sin)


def test_cache_shares_read_only_tables_and_evicts():
    cache = RopeCache(RopeConfig(axes_dim=(8, 4, 4)), maxsize=2)
    first = cache.tables([(4, 4), (2, 8)], 5)
    assert cache.tables(((4, 4), (2, 8)), 5) is first  # lists and tuples give the same key
    assert set(first) == {"img_cos", "img_sin", "txt_cos", "txt_sin"}
    for arr in first.values():
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0, 0] = 1.0
    cache.tables([(4, 4)], 5)
    cache.tables([(4, 4)], 6)  # evicts the least recently used layout
    assert len(cache) == 2
    assert cache.tables([(4, 4), (2, 8)], 5) is not first


def test_config_and_input_errors():
    assert RopeConfig().head_dim == 128 and RopeConfig().half_dim == 64
    assert RopeConfig.from_transformer_config({"axes_dims_rope": [8, 4, 4]}).axes_dim == (8, 4, 4)
    with pytest.raises(InputError, match="attention_head_dim"):
        RopeConfig.from_transformer_config({"axes_dims_rope": [8, 4, 4], "attention_head_dim": 32})
    with pytest.raises(InputError, match="use_layer3d_rope"):
        RopeConfig.from_transformer_config({"use_layer3d_rope": True})
    with pytest.raises(InputError):
        RopeConfig(axes_dim=(8, 3, 4))
    with pytest.raises(InputError):
        image_rope([], RopeConfig())
    with pytest.raises(InputError):
        image_rope([(0, 4)], RopeConfig())
    with pytest.raises(InputError, match="4096"):
        text_rope([(128, 128)], 4096 - 63, RopeConfig())
    assert text_rope([(128, 128)], 4096 - 64, RopeConfig())[0].shape == (4032, 64)
