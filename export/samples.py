"""Representative inputs for export, validation and range measurement: packed layouts per bucket.

Each bucket gets layouts with 1, 2 and 4 references (square and extreme aspects) and short/long prompts. The
target is the bucket's default size at 1024²; above it the target is capped at ``target_area`` pixels so that
validation fits this machine's memory (ONNX Runtime's CPU attention materialises S×S scores); references still
fill the bucket's budget, so the image-token counts stay those of the bucket.
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


def validation_layouts(budget: Budget | int, target_area: int = 512 * 512) -> list[tuple[PackedLayout, int, int]]:
    """(layout, text length, padded tokens) for ``budget`` (a ``Budget``; an int as in ``Budget.coerce``)."""
    budget = as_budget(budget)
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
