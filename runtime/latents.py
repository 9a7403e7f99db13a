"""Latent-space helpers: 2x2 patch packing, VAE normalisation, and seeded noise (numpy).

Token layout follows diffusers' Qwen-Image ``_pack_latents``: a latent [B, C, H, W] becomes [B, (H/2)(W/2), 4C]
with channel-major 2x2 patches.
"""

from __future__ import annotations

import numpy as np


def pack(latent: np.ndarray) -> np.ndarray:
    """[B, C, H, W] -> [B, (H/2)*(W/2), C*4]."""
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2)  # B, C, h', 2, w', 2
    x = x.transpose(0, 2, 4, 1, 3, 5)  # B, h', w', C, 2, 2
    return np.ascontiguousarray(x.reshape(b, (h // 2) * (w // 2), c * 4))


def unpack(tokens: np.ndarray, latent_h: int, latent_w: int) -> np.ndarray:
    """[B, (H/2)*(W/2), C*4] -> [B, C, H, W]."""
    b, _, ch = tokens.shape
    x = tokens.reshape(b, latent_h // 2, latent_w // 2, ch // 4, 2, 2)  # B, h', w', C, 2, 2
    x = x.transpose(0, 3, 1, 4, 2, 5)  # B, C, h', 2, w', 2
    return np.ascontiguousarray(x.reshape(b, ch // 4, latent_h, latent_w))


def normalize(latent: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """VAE latent -> model space: (x - mean) / std, per channel."""
    return ((latent - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)


def denormalize(latent: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Model space -> VAE latent (diffusers divides by 1/std; kept for bit-closeness)."""
    inv = (1.0 / std).astype(np.float32)
    return (latent / inv[None, :, None, None] + mean[None, :, None, None]).astype(np.float32)


def initial_noise(seed: int | None, channels: int, latent_h: int, latent_w: int) -> np.ndarray:
    """Packed standard-normal target latents [1, S_target, 4C] from numpy's PCG64 (not torch's generator)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((1, channels, latent_h, latent_w), dtype=np.float32)
    return pack(noise)
