"""Tiled VAE: encode/decode large images in overlapping spatial tiles, blended linearly (numpy, torch-free).

The algorithm matches diffusers' ``AutoencoderKLQwenImage`` with ``enable_tiling()``: tiles of ``tile`` pixels
start every ``stride`` pixels (latent tiles: both divided by the VAE scale); each tile is blended into its upper
and left neighbours over the overlap with a linear ramp (the neighbours already blended), then cropped to its
``stride`` and the crops stitched. The encoder overlap is measured in latent cells, the decoder overlap in pixels.
Only images wider or taller than a tile are tiled, so the VAE engines never see a side over ``tile``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import InputError

DEFAULT_TILE = 1024
DEFAULT_STRIDE = 768
TILING_KEY = "tiling"  # the key of ``ModelConfig.vae`` holding ``VaeTiling.to_dict()``

Infer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class VaeTiling:
    """Tile side and stride in pixels (overlap = tile - stride); both multiples of ``multiple`` (16)."""

    tile: int = DEFAULT_TILE
    stride: int = DEFAULT_STRIDE
    multiple: int = 16

    def __post_init__(self) -> None:
        if self.tile % self.multiple or self.stride % self.multiple or not 0 < self.stride <= self.tile:
            raise InputError(
                f"VAE tile {self.tile} px / stride {self.stride} px is not valid.",
                f"use multiples of {self.multiple} with 0 < stride <= tile, e.g. tile 1024, stride 768.",
            )

    @property
    def overlap(self) -> int:
        return self.tile - self.stride

    def to_dict(self) -> dict:
        return {"tile": self.tile, "stride": self.stride}

    @classmethod
    def from_vae_config(cls, vae: Mapping) -> VaeTiling | None:
        """The tiling recorded in a manifest's VAE config, or None (untiled)."""
        d = vae.get(TILING_KEY)
        return None if not d else cls(int(d["tile"]), int(d["stride"]))


def _blend(prev: np.ndarray, cur: np.ndarray, extent: int, axis: int) -> None:
    """Ramp ``cur``'s first ``extent`` cells along ``axis`` from ``prev``'s last ones (in place)."""
    extent = min(prev.shape[axis], cur.shape[axis], extent)
    if extent <= 0:
        return
    w = (np.arange(extent, dtype=np.float64) / extent).astype(cur.dtype)
    shape = [1] * cur.ndim
    shape[axis] = extent
    w = w.reshape(shape)
    head = [slice(None)] * cur.ndim
    tail = [slice(None)] * cur.ndim
    head[axis] = slice(0, extent)
    tail[axis] = slice(prev.shape[axis] - extent, prev.shape[axis])
    cur[tuple(head)] = prev[tuple(tail)] * (1 - w) + cur[tuple(head)] * w


def _stitch(rows: list[list[np.ndarray]], blend: int, keep: int, height: int, width: int) -> np.ndarray:
    out_rows = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, blend, axis=2)
            if j > 0:
                _blend(row[j - 1], tile, blend, axis=3)
        out_rows.append(np.concatenate([t[:, :, :keep, :keep] for t in row], axis=3))
    return np.concatenate(out_rows, axis=2)[:, :, :height, :width]


def _tiles(x: np.ndarray, size: int, stride: int, run: Infer) -> list[list[np.ndarray]]:
    h, w = x.shape[2:]
    return [[np.array(run(np.ascontiguousarray(x[:, :, i:i + size, j:j + size])), dtype=np.float32)
             for j in range(0, w, stride)] for i in range(0, h, stride)]


def tiled_encode(encode: Infer, image: np.ndarray, tiling: VaeTiling, scale: int = 8) -> np.ndarray:
    """``image`` [B, 3, H, W] -> latent [B, z, H/scale, W/scale], one ``encode`` call per tile when larger."""
    h, w = image.shape[2:]
    if h <= tiling.tile and w <= tiling.tile:
        return encode(image)
    rows = _tiles(image, tiling.tile, tiling.stride, encode)
    return _stitch(rows, (tiling.tile - tiling.stride) // scale, tiling.stride // scale, h // scale, w // scale)


def tiled_decode(decode: Infer, latent: np.ndarray, tiling: VaeTiling, scale: int = 8) -> np.ndarray:
    """``latent`` [B, z, h, w] -> image [B, 3, h*scale, w*scale], one ``decode`` call per tile when larger."""
    h, w = latent.shape[2:]
    tile, stride = tiling.tile // scale, tiling.stride // scale
    if h <= tile and w <= tile:
        return decode(latent)
    rows = _tiles(latent, tile, stride, decode)
    return _stitch(rows, tiling.overlap, tiling.stride, h * scale, w * scale)
