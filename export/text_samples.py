"""Host inputs of the two text graphs built with transformers' own helpers (the reference for the host side).

``vision_feeds`` uses ``get_vision_window_index``, ``get_vision_position_ids``, ``get_vision_cu_seqlens`` and the
tower's rotary module; ``encoder_feeds`` uses ``get_rope_index`` and the language model's rotary module. The
exporter feeds these to the traced graphs and to ONNX Runtime; the tests feed them beside transformers' forward.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .text_encoder import additive_mask

VISION_EXAMPLE_GRIDS = ((1, 4, 4), (1, 4, 6))  # 40 patches, 10 merged tokens: sizes no static dim has
VISION_SMOKE_GRIDS = (((1, 2, 2),), ((1, 6, 4), (1, 2, 8)))
ENCODER_EXAMPLE_LEN = 11


def _segments(cu: torch.Tensor) -> torch.Tensor:
    cu = cu.long()
    return torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])


@torch.no_grad()
def vision_host_inputs(visual: nn.Module, grids) -> dict[str, torch.Tensor]:
    """window_index, vision_cos/sin (window order) and the two masks for images of ``grids`` [(t, h, w), ...]."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    cfg = visual.config
    grid = torch.tensor([list(g) for g in grids], dtype=torch.long)
    window_index, cu_windows = get_vision_window_index(grid, spatial_merge_size=cfg.spatial_merge_size,
                                                       window_size=cfg.window_size, patch_size=cfg.patch_size)
    positions = get_vision_position_ids(grid, cfg.spatial_merge_size)
    cos, sin = visual.rotary_pos_emb(torch.empty(0), positions)
    n, unit = positions.shape[0], cfg.spatial_merge_size**2

    def permute(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n // unit, unit, -1)[window_index].reshape(n, -1).float()

    windows, images = _segments(cu_windows), _segments(get_vision_cu_seqlens(grid))
    return {"window_index": window_index.long(), "vision_cos": permute(cos), "vision_sin": permute(sin),
            "window_mask": additive_mask(windows[:, None] == windows[None, :]),
            "full_mask": additive_mask(images[:, None] == images[None, :])}


def vision_feeds(visual: nn.Module, grids, seed: int) -> dict[str, np.ndarray]:
    """Random pixel patches for ``grids`` and their host inputs, as numpy feeds of ``text_vision``."""
    n = sum(t * h * w for t, h, w in grids)
    dim = visual.patch_embed.in_channels * visual.patch_embed.temporal_patch_size * visual.patch_embed.patch_size**2
    pixels = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32))
    return {"pixel_patches": pixels.numpy(), **{k: v.numpy() for k, v in vision_host_inputs(visual, grids).items()}}


@torch.no_grad()
def rope_tables(model: nn.Module, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE cos/sin [1, L, head_dim] float32 for 3-D ``position_ids`` [3, 1, L] (the LM's rotary module)."""
    rotary = model.model.language_model.rotary_emb
    cos, sin = rotary(torch.empty(0, dtype=torch.float32), position_ids)
    return cos.float(), sin.float()


@torch.no_grad()
def mrope_positions(model: nn.Module, input_ids: torch.Tensor, grids) -> torch.Tensor:
    """transformers' ``get_rope_index`` positions [3, 1, L] for ``input_ids`` [1, L] with images of ``grids``."""
    image = int(model.config.image_token_id)
    types = (input_ids == image).int()
    grid = torch.tensor([list(g) for g in grids], dtype=torch.long) if grids else None
    if grid is None:
        return torch.arange(input_ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=grid)
    return positions


def causal_mask(length: int) -> torch.Tensor:
    """[1, 1, L, L] additive causal mask."""
    return additive_mask(torch.ones(length, length, dtype=torch.bool).tril())


def encoder_feeds(model: nn.Module, length: int, seed: int, grids=()) -> dict[str, np.ndarray]:
    """Random embeddings [1, L, D] with an image block per grid placed after a few text tokens, its M-RoPE tables
    from ``get_rope_index`` and the causal mask, as numpy feeds of ``text_encoder``."""
    cfg = model.config
    merge = cfg.vision_config.spatial_merge_size**2
    specials = {int(cfg.image_token_id), int(cfg.video_token_id), int(cfg.vision_start_token_id),
                int(cfg.vision_end_token_id)}
    plain = [i for i in range(16, 64) if i not in specials][:4]  # ordinary tokens: no image block but ours
    ids = plain[:3]
    for t, h, w in grids:
        ids += [int(cfg.vision_start_token_id), *[int(cfg.image_token_id)] * (t * h * w // merge),
                int(cfg.vision_end_token_id)]
    ids = (ids + [plain[3]] * length)[:max(length, len(ids))]
    input_ids = torch.tensor([ids])
    cos, sin = rope_tables(model, mrope_positions(model, input_ids, grids))
    rng = np.random.default_rng(seed)
    hidden = int(cfg.text_config.hidden_size)
    embeds = rng.standard_normal((1, len(ids), hidden)).astype(np.float32) * 0.02
    return {"inputs_embeds": embeds, "rope_cos": cos.numpy(), "rope_sin": sin.numpy(),
            "attention_mask": causal_mask(len(ids)).numpy()}
