"""Qwen2.5-VL's host-computed position inputs: 3-D M-RoPE positions and tables, and the vision tower's window
order, rotary tables and attention masks (the inputs of the ``text_encoder`` / ``text_vision`` graphs).

Each function follows the transformers 5.x helper of the same role (``Qwen2_5_VLModel.get_rope_index``,
``Qwen2_5_VLRotaryEmbedding``, ``vision_utils.get_vision_window_index`` / ``get_vision_position_ids`` /
``get_vision_cu_seqlens``, ``Qwen2_5_VLVisionRotaryEmbedding``); the parity tests compare them one to one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ManifestError

__all__ = ["MASKED", "QwenVLConfig", "causal_mask", "mrope_tables", "rope_index", "sequential_positions",
           "vision_inputs"]

MASKED = -65504.0  # additive mask value, finite in fp16 too


@dataclass(frozen=True)
class QwenVLConfig:
    """What the host side needs from the text encoder's ``config.json`` (transformers 4 or 5 layout)."""

    image_token_id: int
    hidden_size: int
    head_dim: int
    rope_theta: float
    mrope_section: tuple[int, ...]
    patch_size: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    vision_head_dim: int
    vision_theta: float
    out_hidden_size: int

    @classmethod
    def from_dict(cls, d: dict) -> QwenVLConfig:
        text = {**d, **d.get("text_config", {})}
        vision = d["vision_config"]
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        heads = text["num_attention_heads"]
        v_rope = vision.get("rope_parameters") or {}
        try:
            return cls(
                image_token_id=int(d.get("image_token_id") or text["image_token_id"]),
                hidden_size=int(text["hidden_size"]),
                head_dim=int(text.get("head_dim") or text["hidden_size"] // heads),
                rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
                mrope_section=tuple(int(v) for v in rope["mrope_section"]),
                patch_size=int(vision["patch_size"]),
                spatial_merge_size=int(vision["spatial_merge_size"]),
                window_size=int(vision["window_size"]),
                fullatt_block_indexes=tuple(int(v) for v in vision["fullatt_block_indexes"]),
                vision_head_dim=int(vision["hidden_size"]) // int(vision["num_heads"]),
                vision_theta=float(v_rope.get("rope_theta", 10000.0)),
                out_hidden_size=int(vision["out_hidden_size"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"The text encoder config lacks a field the host side needs ({err}).",
                                "re-export the artifacts from a Qwen2.5-VL text encoder.") from err

    @classmethod
    def from_file(cls, path: str | Path) -> QwenVLConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def sequential_positions(length: int) -> np.ndarray:
    """[3, L] positions 0..L-1 on all three axes (what the model infers when no 3-D positions are passed)."""
    return np.broadcast_to(np.arange(length, dtype=np.int64), (3, length)).copy()


def rope_index(input_ids: np.ndarray, grids: np.ndarray, cfg: QwenVLConfig) -> np.ndarray:
    """3-D M-RoPE positions [3, L] for one unpadded sequence: text tokens count up on all axes; each image's
    tokens take (start, start + row, start + col) over its merged grid, and the text after it resumes at
    start + max(rows, cols)."""
    m = cfg.spatial_merge_size
    is_image = np.asarray(input_ids) == cfg.image_token_id
    out = np.zeros((3, len(is_image)), dtype=np.int64)
    pos, i, image = 0, 0, 0
    while i < len(is_image):
        if not is_image[i]:
            j = i
            while j < len(is_image) and not is_image[j]:
                j += 1
            out[:, i:j] = np.arange(j - i) + pos
            pos += j - i
            i = j
            continue
        _, gh, gw = (int(v) for v in grids[image])
        rows, cols = gh // m, gw // m
        n = rows * cols
        out[0, i:i + n] = pos
        out[1, i:i + n] = np.repeat(np.arange(rows), cols) + pos
        out[2, i:i + n] = np.tile(np.arange(cols), rows) + pos
        pos += max(rows, cols)
        i += n
        image += 1
    return out


def mrope_tables(positions: np.ndarray, cfg: QwenVLConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [1, L, head_dim] float32: each frequency band takes the axis its ``mrope_section`` assigns
    (t, h, w, t, ...), then the half is repeated, as ``Qwen2_5_VLRotaryEmbedding`` returns them."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    # float32 angles as transformers forms them (positions in the thousands lose bits there; match, not improve)
    freqs = positions[..., None].astype(np.float32) * inv_freq  # [3, L, dim/2]
    bounds = np.cumsum((0, *cfg.mrope_section))
    bands = [freqs[k % 3, :, lo:hi] for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
    angles = np.concatenate(bands, axis=-1)
    angles = np.concatenate([angles, angles], axis=-1)[None]
    angles = angles.astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def causal_mask(length: int) -> np.ndarray:
    """[1, 1, L, L] float32 additive causal mask (0 on and below the diagonal, ``MASKED`` above)."""
    return np.triu(np.full((length, length), MASKED, dtype=np.float32), k=1)[None, None]


def _window_order(grids: np.ndarray, cfg: QwenVLConfig) -> tuple[np.ndarray, list[int]]:
    """Merged-token permutation that makes each attention window contiguous, and the window lengths (patches)."""
    m = cfg.spatial_merge_size
    win = cfg.window_size // m // cfg.patch_size
    order, lengths, offset = [], [], 0
    for t, gh, gw in (tuple(int(v) for v in g) for g in grids):
        rows, cols = gh // m, gw // m
        pad_r, pad_c = win - rows % win, win - cols % win
        index = np.full((t, rows + pad_r, cols + pad_c), -1, dtype=np.int64)
        index[:, :rows, :cols] = np.arange(t * rows * cols).reshape(t, rows, cols)
        nr, nc = (rows + pad_r) // win, (cols + pad_c) // win
        blocks = index.reshape(t, nr, win, nc, win).transpose(0, 1, 3, 2, 4).reshape(t * nr * nc, win * win)
        for block in blocks:
            kept = block[block >= 0]
            if kept.size:
                order.append(kept + offset)
                lengths.append(int(kept.size) * m * m)
        offset += t * rows * cols
    return (np.concatenate(order) if order else np.zeros(0, dtype=np.int64)), lengths


def _block_mask(lengths: list[int]) -> np.ndarray:
    n = sum(lengths)
    mask = np.full((n, n), MASKED, dtype=np.float32)
    start = 0
    for size in lengths:
        mask[start:start + size, start:start + size] = 0.0
        start += size
    return mask[None, None]


def _vision_rotary(grids: np.ndarray, cfg: QwenVLConfig) -> np.ndarray:
    """Rotary angles [N, vision_head_dim] per patch in the processor's order: (row, col) bands, repeated."""
    m = cfg.spatial_merge_size
    pos = []
    for t, gh, gw in (tuple(int(v) for v in g) for g in grids):
        rows = np.arange(gh)[:, None].repeat(gw, 1).reshape(gh // m, m, gw // m, m).transpose(0, 2, 1, 3).ravel()
        cols = np.arange(gw)[None, :].repeat(gh, 0).reshape(gh // m, m, gw // m, m).transpose(0, 2, 1, 3).ravel()
        pos.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    ids = np.concatenate(pos) if pos else np.zeros((0, 2), dtype=np.int64)
    spatial = cfg.vision_head_dim // 2
    inv_freq = 1.0 / (cfg.vision_theta ** (np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)))
    freqs = ids[..., None].astype(np.float32) * inv_freq  # [N, 2, head_dim/4], float32 as transformers
    half = np.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
    return np.concatenate([half, half], axis=-1)


def vision_inputs(grids: np.ndarray, cfg: QwenVLConfig) -> dict[str, np.ndarray]:
    """The ``text_vision`` graph's host inputs for images of ``grids`` [n, 3] (t, h, w in patches).

    Returns ``window_index`` int64 [M], ``vision_cos``/``vision_sin`` float32 [N, vision_head_dim] in window
    order, and ``window_mask``/``full_mask`` float32 [1, 1, N, N] (additive, window order).
    """
    unit = cfg.spatial_merge_size ** 2
    window_index, window_lengths = _window_order(grids, cfg)
    angles = _vision_rotary(grids, cfg)
    angles = angles.reshape(-1, unit, angles.shape[-1])[window_index].reshape(angles.shape)
    image_lengths = [int(h * w) for t, h, w in grids for _ in range(int(t))]  # one segment per frame
    return {
        "window_index": window_index.astype(np.int64),
        "vision_cos": np.cos(angles.astype(np.float64)).astype(np.float32),
        "vision_sin": np.sin(angles.astype(np.float64)).astype(np.float32),
        "window_mask": _block_mask(window_lengths),
        "full_mask": _block_mask(image_lengths),
    }
