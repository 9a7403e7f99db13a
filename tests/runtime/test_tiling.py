"""Tests for the tiled VAE (``runtime/tiling.py``): tile geometry, and parity with diffusers' tiled
``AutoencoderKLQwenImage`` (``enable_tiling``) when our tiles run in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.tiling import VaeTiling, tiled_decode, tiled_encode

SCALE = 8


def _down(x: np.ndarray) -> np.ndarray:
    """A pointwise stand-in "encoder": every 8th pixel, so tiling must reproduce it exactly."""
    return x[:, :, ::SCALE, ::SCALE] * 2.0


def _up(z: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(z, SCALE, axis=2), SCALE, axis=3) - 1.0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(2, 6), st.integers(1, 6))
def test_tiles_of_a_pointwise_vae_stitch_to_the_untiled_result(h16, w16, tile16, stride16):
    stride16 = min(stride16, tile16)
    tiling = VaeTiling(16 * tile16, 16 * stride16)
    rng = np.random.default_rng(h16 * 100 + w16)
    image = rng.standard_normal((1, 3, 16 * h16, 16 * w16)).astype(np.float32)
    seen = []

    def enc(t):
        seen.append(t.shape[2:])
        return _down(t)

    np.testing.assert_allclose(tiled_encode(enc, image, tiling, SCALE), _down(image), rtol=0, atol=1e-5)
    assert all(16 <= s <= tiling.tile for shape in seen for s in shape)
    latent = rng.standard_normal((1, 4, 2 * h16, 2 * w16)).astype(np.float32)
    np.testing.assert_allclose(tiled_decode(_up, latent, tiling, SCALE), _up(latent), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tile, stride", [(1000, 768), (1024, 0), (512, 768)])
def test_bad_tiling_is_an_input_error(tile, stride):
    with pytest.raises(InputError, match="tile"):
        VaeTiling(tile, stride)


# --- parity with diffusers' tiled VAE on ONNX Runtime ------------------------------------------------------------

TILE, STRIDE = 64, 48


@pytest.fixture(scope="module")
def tiny_vae_onnx(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from diffusers import AutoencoderKLQwenImage

    from uniref_deploy.export.graph_export import export_graph
    from uniref_deploy.export.qwen_image import VaeDecoderForExport, VaeEncoderForExport
    from uniref_deploy.runtime.graphs import VAE_DECODER, VAE_ENCODER, graph_io
    from uniref_deploy.runtime.manifest import ModelConfig

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True]).eval()
    config = ModelConfig("qwen-image", {"joint_attention_dim": 16},
                         {"z_dim": 4, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, {})
    root = tmp_path_factory.mktemp("vae")
    paths = {}
    # batch-2 examples: a batch-1 trace would fix the dynamic batch axis (the exporter refuses that)
    for name, module, arg in ((VAE_ENCODER, VaeEncoderForExport(vae), torch.rand(2, 3, 32, 48) * 2 - 1),
                              (VAE_DECODER, VaeDecoderForExport(vae), torch.randn(2, 4, 4, 6))):
        inputs, outputs = graph_io(name, config)
        paths[name] = export_graph(module.eval(), (arg,), root / f"{name}.onnx", inputs, outputs)
    return vae, paths


def _session(path):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name, out = s.get_inputs()[0].name, s.get_outputs()[0].name
    return lambda x: s.run([out], {name: x.astype(np.float32)})[0]


@pytest.mark.slow
def test_tiled_encode_and_decode_match_diffusers_tiled_vae(tiny_vae_onnx):
    import torch

    vae, paths = tiny_vae_onnx
    tiling = VaeTiling(TILE, STRIDE)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 3, 112, 160)).astype(np.float32)  # 3 x 4 tiles, edge tiles of 16 px
    latent = rng.standard_normal((1, 4, 14, 20)).astype(np.float32)
    ours_z = tiled_encode(_session(paths["vae_encoder"]), image, tiling, SCALE)
    ours_x = tiled_decode(_session(paths["vae_decoder"]), latent, tiling, SCALE)
    vae.enable_tiling(tile_sample_min_height=TILE, tile_sample_min_width=TILE,
                      tile_sample_stride_height=STRIDE, tile_sample_stride_width=STRIDE)
    try:
        with torch.no_grad():
            ref_z = vae.encode(torch.from_numpy(image)[:, :, None]).latent_dist.mode()[:, :, 0].numpy()
            ref_x = vae.decode(torch.from_numpy(latent)[:, :, None]).sample[:, :, 0].numpy()
    finally:
        vae.disable_tiling()
    assert ours_z.shape == ref_z.shape and ours_x.shape == ref_x.shape
    assert np.abs(ours_z - ref_z).max() <= 1e-4 * np.abs(ref_z).max()
    # our decoder graph clamps each tile to [-1, 1] (untiled diffusers decode); the pipeline clamps the result
    ref_x = np.clip(ref_x, -1, 1)
    assert np.abs(ours_x - ref_x).max() <= 1e-4 * np.abs(ref_x).max()
    # and tiling is not a no-op: the untiled decode differs in the overlaps
    whole = _session(paths["vae_decoder"])(latent)
    assert np.abs(whole - ours_x).max() > 1e-3


# --- the tile bounds the VAE engine profiles ---------------------------------------------------------------------


@pytest.mark.slow
def test_export_records_the_tiling_and_the_plan_uses_it(tiny_artifacts):
    from uniref_deploy.engines.plan import make_plan
    from uniref_deploy.runtime.manifest import Manifest

    manifest = Manifest.load(tiny_artifacts)
    tiling = VaeTiling.from_vae_config(manifest.model.vae)
    assert tiling == VaeTiling()
    plan = make_plan(manifest, [b for b in manifest.budgets])
    assert plan.options.vae_tile == tiling.tile
    vae = [e for e in plan.engines if e.graph in ("vae_encoder", "vae_decoder")]
    assert {e.graph for e in vae} == {"vae_encoder", "vae_decoder"}
    for engine in vae:  # latent sides for the decoder are tile / 8: bounded too
        assert all(r.max <= tiling.tile for p in engine.profiles for _, r in p.axes if r.max > 1), engine.graph


class _Recorder:
    """A backend that records the shapes it is fed and applies the pointwise stand-in VAE."""

    fixed_buckets = False  # runs any budget, like the ONNX Runtime backend

    def __init__(self, fn, key_in, key_out):
        self.fn, self.key_in, self.key_out, self.shapes = fn, key_in, key_out, []

    def infer(self, feeds):
        x = feeds[self.key_in]
        self.shapes.append(x.shape)
        return {self.key_out: self.fn(x)}


@pytest.mark.parametrize("tiling", [None, {"tile": 64, "stride": 48}])
def test_pipeline_runs_the_vae_in_manifest_tiles(tiling):
    from uniref_deploy.runtime.graphs import VAE_DECODER, VAE_ENCODER
    from uniref_deploy.runtime.manifest import ModelConfig
    from uniref_deploy.runtime.pipeline import Pipeline

    t = {"in_channels": 16, "out_channels": 4, "patch_size": 2, "axes_dims_rope": [4, 6, 6], "joint_attention_dim": 8}
    v = {"z_dim": 4, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
    if tiling:
        v["tiling"] = tiling
    enc, dec = _Recorder(_down, "image", "latent"), _Recorder(_up, "latent", "image")
    pipe = Pipeline(ModelConfig("qwen-image", t, v, {}), {VAE_ENCODER: enc, VAE_DECODER: dec})
    image = np.random.default_rng(0).uniform(-1, 1, (1, 3, 96, 160)).astype(np.float32)
    latent = np.random.default_rng(1).standard_normal((1, 4, 12, 20)).astype(np.float32)
    np.testing.assert_allclose(pipe._vae(VAE_ENCODER, image), _down(image), atol=1e-5)
    np.testing.assert_allclose(pipe._vae(VAE_DECODER, latent), _up(latent), atol=1e-5)
    longest = max(max(s[2:]) for s in enc.shapes)
    assert longest == (64 if tiling else 160) and len(enc.shapes) == (2 * 4 if tiling else 1)  # rows at 0, 48; columns at 0..144
    assert max(max(s[2:]) * 8 for s in dec.shapes) == (64 if tiling else 160)
