"""Representative inputs for export, validation and range measurement: packed layouts per bucket.

Each bucket gets layouts with 1, 2 and 4 references (square and extreme aspects) and short/long prompts. The
target is the bucket's default size at 1024²; above it the target is capped at ``target_area`` pixels so that
validation fits this machine's memory (ONNX Runtime's CPU attention materialises S×S scores); references still
fill the bucket's budget, so the image-token counts stay those of the bucket. ``validation_area`` (the CLI's
``--validation-area``) packs the layouts at that many pixels instead of the bucket's, for real-width models whose
S×S scores at a full bucket do not fit in memory.

The smoke samples (``smoke_samples``) are a few hundred image tokens at batch 1 and 2: every export runs them, even
without the full validation, so that no graph reaches the manifest untried at either batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.manifest import ModelConfig
from uniref_deploy.runtime.packing import PackedLayout, as_budget, pack_references
from uniref_deploy.runtime.rope import RopeCache, RopeConfig, modulation_index

# (reference sizes, text length, padded text tokens)
LAYOUT_CASES = (
    ((( 1024, 1024),), 8, 0),
    (((1024, 1024), (512, 2048)), 300, 0),
    (((1024, 1024), (2048, 256), (600, 1800), (900, 700)), 77, 5),
)


@dataclass(frozen=True)
class Sample:
    """One DiT call: the layout and its feeds (float32/bool/int32 numpy)."""

    layout: PackedLayout
    feeds: dict[str, np.ndarray]

    @property
    def label(self) -> str:
        txt = self.feeds["encoder_hidden_states"].shape[1]
        return f"b{self.layout.budget.name} refs={len(self.layout.references)} img={self.layout.num_image_tokens} txt={txt}"


# (reference sizes, text length, batch, budget pixels, target width x height): the smallest budgets that hold the
# references (256² each), a small target: 80 + 256 and 64 + 512 image tokens
SMOKE_CASES = (((( 96, 160),), 16, 1, 256 * 256, (128, 160)), (((160, 96), (128, 128)), 9, 2, 2 * 256 * 256, (128, 128)))


def validation_layouts(budget: Budget | int, target_area: int = 512 * 512,
                       validation_area: int | None = None) -> list[tuple[PackedLayout, int, int]]:
    """(layout, text length, padded tokens) for ``budget`` (a ``Budget``; an int as in ``Budget.coerce``), packed
    at ``validation_area`` pixels instead when that is given and smaller."""
    budget = as_budget(budget)
    if validation_area is not None:
        budget = min(budget, Budget.from_pixels(int(validation_area)))
    out = []
    for sizes, txt, pad in LAYOUT_CASES:
        if budget <= Budget.from_side(1024):
            layout = pack_references(sizes, budget)
        else:
            w, h = sizes[-1]
            side_w = max(16, int(math.sqrt(target_area * w / h)) // 16 * 16)
            side_h = max(16, int(math.sqrt(target_area * h / w)) // 16 * 16)
            layout = pack_references(sizes, budget, width=side_w, height=side_h)
        out.append((layout, txt, pad))
    return out


def dit_sample(config: ModelConfig, layout: PackedLayout, text_len: int, pad: int = 0, batch: int = 1,
               seed: int = 0, timestep: float | None = None, rope: RopeCache | None = None) -> Sample:
    """Random but realistic DiT feeds for ``layout`` (unit-normal latents and text, timestep in (0, 1))."""
    rng = np.random.default_rng(seed)
    t = config.transformer
    rope = rope or RopeCache(RopeConfig.from_transformer_config(t))
    mask = np.ones((batch, text_len), dtype=bool)
    if pad:
        mask[:, text_len - pad:] = False
    feeds = {
        "hidden_states": rng.standard_normal((batch, layout.num_image_tokens, int(t["in_channels"])), dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, text_len, config.text_hidden_size), dtype=np.float32),
        "encoder_hidden_states_mask": mask,
        "timestep": np.full((batch,), rng.uniform(0.02, 1.0) if timestep is None else timestep, dtype=np.float32),
        **{k: np.array(v) for k, v in rope.tables(layout.grids, text_len).items()},
    }
    if config.zero_cond_t:
        feeds["modulate_index"] = modulation_index(layout.grids)
    return Sample(layout, feeds)


def smoke_samples(config: ModelConfig, rope: RopeCache | None = None) -> list[Sample]:
    """The DiT smoke inputs: one reference at batch 1, two references at batch 2, unpadded text, 300-600 tokens."""
    return [dit_sample(config, pack_references(sizes, budget, width=w, height=h), txt, batch=batch, seed=100 + i,
                       rope=rope)
            for i, (sizes, txt, batch, budget, (w, h)) in enumerate(SMOKE_CASES)]


def vae_smoke_samples(config: ModelConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """VAE smoke inputs at batch 1 and 2: (images [B, 3, H, W] in [-1, 1], latents [B, z, h, w])."""
    rng = np.random.default_rng(2)
    images = [rng.uniform(-1, 1, (b, 3, h, w)).astype(np.float32) for b, h, w in ((1, 48, 80), (2, 64, 32))]
    latents = [rng.standard_normal((b, config.latent_channels, h, w)).astype(np.float32)
               for b, h, w in ((1, 6, 10), (2, 8, 4))]
    return images, latents


def vae_encoder_samples(layouts: list[PackedLayout], limit: int = 3) -> list[np.ndarray]:
    """Reference-sized images in [-1, 1] (distinct sizes, at most ``limit``)."""
    sizes = sorted({(s.width, s.height) for lay in layouts for s in lay.references}, key=lambda s: s[0] * s[1])
    rng = np.random.default_rng(0)
    picks = sizes[:: max(1, len(sizes) // limit)][:limit]
    return [rng.uniform(-1, 1, (1, 3, h, w)).astype(np.float32) for w, h in picks]


def vae_decoder_samples(config: ModelConfig, layouts: list[PackedLayout], limit: int = 2) -> list[np.ndarray]:
    """Target-sized latents (distinct sizes, at most ``limit``)."""
    sizes = sorted({(lay.target.latent_w, lay.target.latent_h) for lay in layouts})[:limit]
    rng = np.random.default_rng(1)
    return [rng.standard_normal((1, config.latent_channels, h, w)).astype(np.float32) for w, h in sizes]
