"""The Qwen2-VL image processor in numpy: condition images -> flattened vision patches, as transformers makes them.

transformers 5.x loads ``Qwen2VLImageProcessor`` (the torchvision backend) for every Qwen-Image processor folder,
and diffusers' edit pipelines hand it PIL images. That backend resizes the uint8 image with torch's antialiased
bicubic kernel, which on CPU runs in integer arithmetic (PyTorch ``UpSampleKernel.cpp``: per-axis int16 weights
with a computed precision, width pass then height pass, each rounded and clipped to uint8). Its result differs
from PIL's bicubic by a few levels, so this module reproduces the torch kernel, then the fused rescale + mean/std
normalisation in float32 and the patch layout (merge blocks, channel, temporal copy, patch rows/cols).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError, ManifestError

__all__ = ["ImageProcessorConfig", "preprocess_images", "resize_bicubic_uint8", "smart_resize"]

_CUBIC_A = -0.5  # Keys' cubic for antialiased resizing (torch and PIL)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The processor settings the vision tower was trained with (``preprocessor_config.json``)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessorConfig:
        """Read either layout: transformers 4 (``min_pixels``/``max_pixels``) or 5 (``size`` edges)."""
        size = d.get("size") or {}
        kw = {
            "min_pixels": d.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
            "max_pixels": d.get("max_pixels", size.get("longest_edge", cls.max_pixels)),
        }
        for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor"):
            if key in d:
                kw[key] = d[key]
        for key in ("image_mean", "image_std"):
            if key in d:
                kw[key] = tuple(float(v) for v in d[key])
        if d.get("resample", 3) != 3 or d.get("do_resize", True) is False or d.get("do_normalize", True) is False:
            raise ManifestError("The processor config asks for a resize/normalisation this runtime does not do.",
                                "re-export with the model's own Qwen2-VL processor config.")
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | Path) -> ImageProcessorConfig:
        """``preprocessor_config.json``, or a transformers 5 ``processor_config.json`` holding ``image_processor``."""
        d = json.loads(Path(path).read_text())
        return cls.from_dict(d.get("image_processor", d))


def smart_resize(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """(h, w) multiples of ``cfg.factor`` with an area within [min_pixels, max_pixels], aspect kept closely.

    Raises:
        InputError: an aspect beyond 200:1 (transformers refuses it too).
    """
    factor = cfg.factor
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"A condition image of {width}x{height} has an aspect over 200:1, which the vision "
                         "processor cannot take.", "crop the reference closer to a normal aspect.")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > cfg.max_pixels:
        beta = math.sqrt(height * width / cfg.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic kernel (a = -0.5) in float64, term order as torch evaluates it."""
    a = _CUBIC_A
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _axis_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer taps for one axis: (source index [out, k], int16-range weights [out, k], precision bits)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    kmax = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, kmax), dtype=np.float64)
    starts = np.zeros(out_size, dtype=np.int64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)  # C casts truncate toward zero
        xsize = min(max(min(int(center + support + 0.5), in_size) - xmin, 0), kmax)
        w = _cubic((np.arange(xsize) + xmin - center + 0.5) * invscale)
        total = w.sum()
        weights[i, :xsize] = w / total if total != 0.0 else w
        starts[i] = xmin
    wt_max = weights.max()
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    ints = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
    index = np.minimum(starts[:, None] + np.arange(kmax)[None], in_size - 1)
    return index, ints, precision


def _resample_axis(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One integer pass along ``axis`` (0 = rows, 1 = columns) of an HWC uint8 image."""
    index, weights, precision = _axis_taps(img.shape[axis], out_size)
    src = np.moveaxis(img, axis, 0).astype(np.int64)  # [in, other, C]
    acc = np.einsum("ok,okxc->oxc", weights, src[index], optimize=True) + (1 << (precision - 1))
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_bicubic_uint8(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch's antialiased bicubic resize of an HWC uint8 image on CPU, bit for bit (width first, then height)."""
    if img.shape[1] != width:
        img = _resample_axis(img, width, 1)
    if img.shape[0] != height:
        img = _resample_axis(img, height, 0)
    return img


def _patchify(pixels: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """CHW float32 -> [grid_h * grid_w, C * T * p * p] in transformers' order (merge blocks row-major)."""
    c, h, w = pixels.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = pixels.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # one still frame repeated T times
    return np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p)


def preprocess_images(images: Sequence[Image.Image], cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Vision patches [N, C*T*p*p] float32 and grids [n_images, 3] int64 (t, h, w in patches).

    Raises:
        InputError: an image the processor cannot take (zero area, aspect over 200:1).
    """
    mean = np.asarray(cfg.image_mean, dtype=np.float32) * np.float32(1.0 / cfg.rescale_factor)
    std = np.asarray(cfg.image_std, dtype=np.float32) * np.float32(1.0 / cfg.rescale_factor)
    patches, grids = [], []
    for img in images:
        if img.width < 1 or img.height < 1:
            raise InputError(f"A condition image has zero area ({img.width}x{img.height}).", "pass a real image.")
        rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
        h, w = smart_resize(img.height, img.width, cfg)
        resized = resize_bicubic_uint8(rgb, h, w)
        pixels = (resized.transpose(2, 0, 1).astype(np.float32) - mean[:, None, None]) / std[:, None, None]
        patches.append(_patchify(pixels, cfg))
        grids.append((1, h // cfg.patch_size, w // cfg.patch_size))
    if not patches:
        return np.zeros((0, cfg.patch_dim), dtype=np.float32), np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(patches).astype(np.float32, copy=False), np.asarray(grids, dtype=np.int64)
