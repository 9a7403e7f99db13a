"""Tiled vs untiled VAE on the ``small`` preset's VAE (diffusers, CPU): latent and image PSNR per image size.

The tiles run through ``runtime/tiling.py`` (our blending) around diffusers' untiled encoder/decoder, so the
figures measure the tiling alone. Images are smooth procedural scenes in [-1, 1]; image PSNR uses peak 2.

    python benchmarks/vae_tiling_psnr.py [--sizes 1024,1536,2048] [--tile 1024 --stride 768]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from uniref_deploy.export.presets import PRESETS, _build_vae
from uniref_deploy.runtime.tiling import VaeTiling, tiled_decode, tiled_encode


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


def scene(side: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    img = np.zeros((3, side, side))
    for c in range(3):
        for _ in range(6):
            fx, fy, ph = rng.uniform(1, 12, 2).tolist() + [rng.uniform(0, 6.3)]
            img[c] += np.sin(2 * np.pi * (fx * x + fy * y) + ph) / 6
    img += (np.hypot(x - 0.5, y - 0.5) < 0.2) * 0.5  # a hard edge
    return np.clip(img, -1, 1)[None].astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,1536,2048")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=768)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    vae = _build_vae(PRESETS["small"], seed=0)
    tiling = VaeTiling(args.tile, args.stride)

    def enc(x: np.ndarray) -> np.ndarray:
        return vae.encode(torch.from_numpy(x)[:, :, None]).latent_dist.mode()[:, :, 0].numpy()

    def dec(z: np.ndarray) -> np.ndarray:
        return vae.decode(torch.from_numpy(z)[:, :, None]).sample[:, :, 0].numpy()

    print(f"small VAE, tile {tiling.tile} px, stride {tiling.stride} px (overlap {tiling.overlap} px)")
    print(f"{'size':>6}  {'latent PSNR dB':>14}  {'image PSNR dB':>13}  {'seconds':>7}")
    for side in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        image = scene(side)
        z_full = enc(image)
        z_tiled = tiled_encode(enc, image, tiling)
        lat = psnr(z_tiled, z_full, float(z_full.max() - z_full.min()))
        x_full = np.clip(dec(z_full), -1, 1)
        x_tiled = np.clip(tiled_decode(dec, z_full, tiling), -1, 1)
        print(f"{side:>6}  {lat:>14.2f}  {psnr(x_tiled, x_full, 2.0):>13.2f}  {time.perf_counter() - t0:>7.1f}",
              flush=True)


if __name__ == "__main__":
    main()
