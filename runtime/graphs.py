"""The I/O contract of the three graphs (DiT, VAE encoder, VAE decoder) shared by every backend.

All boundary tensors are float32 whatever the internal precision, so backends are interchangeable; dynamic
axes carry names that the exporter, the engine planner and the backends agree on.
"""

from __future__ import annotations

import numpy as np

from .manifest import ModelConfig, TensorSpec
from .packing import PackedLayout
from .rope import RopeCache, modulation_index

DIT, VAE_ENCODER, VAE_DECODER = "dit", "vae_encoder", "vae_decoder"
GRAPH_NAMES = (DIT, VAE_ENCODER, VAE_DECODER)

BATCH, IMG_TOKENS, TXT_TOKENS = "batch", "img_tokens", "txt_tokens"
HEIGHT, WIDTH, LATENT_HEIGHT, LATENT_WIDTH = "height", "width", "latent_height", "latent_width"

#: DiT inputs in graph order (``modulate_index`` only for zero_cond_t models), and the RoPE tables among them:
#: the exporter keeps those float32 at every precision, by position.
DIT_INPUTS = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep",
              "img_cos", "img_sin", "txt_cos", "txt_sin", "modulate_index")
ROPE_INPUTS = ("img_cos", "img_sin", "txt_cos", "txt_sin")
ROPE_INPUT_POSITIONS = tuple(DIT_INPUTS.index(name) for name in ROPE_INPUTS)  # (4, 5, 6, 7)


def dit_io(config: ModelConfig) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """DiT inputs/outputs.

    hidden_states [B, S_img, 4z] (target tokens first, then references), encoder_hidden_states [B, S_txt, D],
    encoder_hidden_states_mask [B, S_txt] (bool), timestep [B] (t / 1000), RoPE tables [S, head_dim / 2], and for
    zero_cond_t models modulate_index [S_img] (0 target, 1 reference). Output velocity [B, S_img, 4z].
    """
    t = config.transformer
    in_ch = int(t["in_channels"])
    out_ch = int(t.get("out_channels") or in_ch // 4) * int(t.get("patch_size", 2)) ** 2
    half = sum(t.get("axes_dims_rope", (16, 56, 56))) // 2
    dtypes_shapes = {
        "hidden_states": ("float32", (BATCH, IMG_TOKENS, in_ch)),
        "encoder_hidden_states": ("float32", (BATCH, TXT_TOKENS, config.text_hidden_size)),
        "encoder_hidden_states_mask": ("bool", (BATCH, TXT_TOKENS)),
        "timestep": ("float32", (BATCH,)),
        "img_cos": ("float32", (IMG_TOKENS, half)),
        "img_sin": ("float32", (IMG_TOKENS, half)),
        "txt_cos": ("float32", (TXT_TOKENS, half)),
        "txt_sin": ("float32", (TXT_TOKENS, half)),
        "modulate_index": ("int32", (IMG_TOKENS,)),
    }
    names = DIT_INPUTS if config.zero_cond_t else DIT_INPUTS[:-1]
    inputs = [TensorSpec(name, *dtypes_shapes[name]) for name in names]
    outputs = (TensorSpec("velocity", "float32", (BATCH, IMG_TOKENS, out_ch)),)
    return tuple(inputs), outputs


def vae_encoder_io(config: ModelConfig) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """image [B, 3, H, W] in [-1, 1] -> latent [B, z, H/8, W/8] (distribution mode, not normalised)."""
    z = config.latent_channels
    return (
        (TensorSpec("image", "float32", (BATCH, 3, HEIGHT, WIDTH)),),
        (TensorSpec("latent", "float32", (BATCH, z, LATENT_HEIGHT, LATENT_WIDTH)),),
    )


def vae_decoder_io(config: ModelConfig) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """latent [B, z, h, w] (not normalised) -> image [B, 3, 8h, 8w] in about [-1, 1]."""
    z = config.latent_channels
    return (
        (TensorSpec("latent", "float32", (BATCH, z, LATENT_HEIGHT, LATENT_WIDTH)),),
        (TensorSpec("image", "float32", (BATCH, 3, HEIGHT, WIDTH)),),
    )


def dit_static_feeds(config: ModelConfig, rope: RopeCache, layout: PackedLayout, embeds: np.ndarray,
                     mask: np.ndarray) -> dict[str, np.ndarray]:
    """The DiT feeds that stay fixed over a denoising loop: text embeddings [1, L, D], mask [1, L], the RoPE
    tables of ``layout`` and, for zero_cond_t models, ``modulate_index``."""
    feeds = {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask,
             **rope.tables(layout.grids, embeds.shape[1])}
    if config.zero_cond_t:
        feeds["modulate_index"] = modulation_index(layout.grids)
    return feeds


GRAPH_IO = {DIT: dit_io, VAE_ENCODER: vae_encoder_io, VAE_DECODER: vae_decoder_io}


def graph_io(name: str, config: ModelConfig) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of graph ``name``."""
    return GRAPH_IO[name](config)
