"""Tiled vs untiled VAE on the ``small`` preset's VAE (diffusers, CPU): latent and image PSNR per image size.

The tiles run through ``runtime/tiling.py`` (our blending) around diffusers' untiled encoder/decoder, so the
figures measure the tiling alone: encode PSNR compares the tiled latent with the untiled one, decode PSNR the
tiled decode of the untiled latent with its untiled decode. Images are smooth procedural scenes with a hard edge in
[-1, 1]; image PSNR uses peak 2, latent PSNR the untiled latent's range. Only images larger than a tile are tiled,
so a size <= the tile gives identical outputs (PSNR inf, null in the JSON).

Memory: a single image is one frame, so each of the VAE's causal 3-D convolutions sees two zero frames of causal
padding and one real frame; diffusers materialises the 3-frame padded input. ``--lean-convs`` (default on) runs
those convolutions as the equivalent 2-D convolution with the kernel's last time slice (same function, float
summation order aside; checked against the unpatched VAE on a small image first), which keeps the untiled
2048^2 reference within ~6 GiB. Both the tiled and the untiled runs use the same convolutions.

    python benchmarks/vae_tiling_psnr.py [--sizes 1024,1536,2048] [--tile 1024 --stride 768] \
        [--out docs/benchmarks/vae_tiling_psnr.json] [--plot docs/benchmarks/vae_tiling_psnr.png]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from uniref_deploy.presets.seeded import PRESETS, _build_vae
from uniref_deploy.runtime.tiling import Infer, VaeTiling, tiled_decode, tiled_encode


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


def _db(value: float) -> float | None:
    """Rounded dB; None (JSON null) for identical outputs (inf)."""
    return round(value, 2) if np.isfinite(value) else None


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextlib.contextmanager
def lean_convs() -> Iterator[None]:
    """Run single-frame causal 3-D convolutions without cache as 2-D convolutions (same function, less memory)."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    original = QwenImageCausalConv3d.forward

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        kt = self.kernel_size[0]
        if cache_x is not None or x.shape[2] != 1 or self._padding[4] != kt - 1 or self.stride[0] != 1:
            return original(self, x, cache_x)
        pw, ph = self._padding[0], self._padding[2]
        y = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, stride=self.stride[1:], padding=(ph, pw))
        return y[:, :, None]

    QwenImageCausalConv3d.forward = forward
    try:
        yield
    finally:
        QwenImageCausalConv3d.forward = original


def codec(vae: torch.nn.Module, lean: bool) -> tuple[Infer, Infer]:
    """Single-image encode (latent mean) and decode (clamped) of ``vae``, numpy in and out.

    ``lean`` calls the encoder/decoder without their causal feature cache (it only matters for later video frames;
    diffusers keeps a copy of every convolution's input in it) and runs each causal 3-D convolution as a 2-D one.
    """
    if not lean:
        return (lambda x: vae.encode(torch.from_numpy(x)[:, :, None]).latent_dist.mode()[:, :, 0].numpy(),
                lambda z: vae.decode(torch.from_numpy(z)[:, :, None]).sample[:, :, 0].numpy())
    z_dim = vae.config.z_dim

    def enc(x: np.ndarray) -> np.ndarray:
        with lean_convs():
            h = vae.quant_conv(vae.encoder(torch.from_numpy(x)[:, :, None], feat_cache=None))
        return h[:, :z_dim, 0].numpy()

    def dec(z: np.ndarray) -> np.ndarray:
        with lean_convs():
            x = vae.decoder(vae.post_quant_conv(torch.from_numpy(z)[:, :, None]), feat_cache=None)
        return torch.clamp(x, -1.0, 1.0)[:, :, 0].numpy()

    return enc, dec


def check_lean(vae: torch.nn.Module, side: int = 128) -> float:
    """Max abs difference of encode+decode, lean vs diffusers' own path, on a small scene."""
    image = scene(side, seed=1)
    (enc, dec), (lean_enc, lean_dec) = codec(vae, lean=False), codec(vae, lean=True)
    return max(float(np.abs(enc(image) - lean_enc(image)).max()),
               float(np.abs(dec(enc(image)) - lean_dec(enc(image))).max()))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["latent_psnr_db"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    sides = [r["side"] for r in rows]
    ax.plot(sides, [r["latent_psnr_db"] for r in rows], "o-", label="encode (latent)")
    ax.plot(sides, [r["image_psnr_db"] for r in rows], "s-", label="decode (image)")
    ax.set_xticks(sides, [f"{s}²" for s in sides])
    ax.set_xlabel("image size")
    ax.set_ylabel("PSNR tiled vs untiled (dB)")
    ax.set_title(f"small VAE, tile {result['tile']} px, stride {result['stride']} px")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,1536,2048")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=768)
    ap.add_argument("--no-lean", dest="lean", action="store_false", help="diffusers' own encode/decode (more memory)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument("--plot", type=Path, help="write a PNG figure here")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    vae = _build_vae(PRESETS["small"], seed=0)
    tiling = VaeTiling(args.tile, args.stride)
    enc, dec = codec(vae, args.lean)

    result = {"vae": "small (seed 0)", "tile": tiling.tile, "stride": tiling.stride, "overlap": tiling.overlap,
              "lean": args.lean, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "rows": []}
    if args.lean:
        result["lean_max_abs_diff"] = check_lean(vae)
        print(f"lean vs diffusers' own path, 128^2 encode and decode: max abs diff {result['lean_max_abs_diff']:.2e}")
    print(f"small VAE, tile {tiling.tile} px, stride {tiling.stride} px (overlap {tiling.overlap} px)")
    print(f"{'size':>6}  {'latent PSNR dB':>14}  {'image PSNR dB':>13}  {'seconds':>7}  {'peak RSS GiB':>12}")
    for side in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        image = scene(side)
        z_full = enc(image)
        z_tiled = tiled_encode(enc, image, tiling)
        lat = psnr(z_tiled, z_full, float(z_full.max() - z_full.min()))
        del z_tiled, image
        gc.collect()
        x_full = np.clip(dec(z_full), -1, 1)
        x_tiled = np.clip(tiled_decode(dec, z_full, tiling), -1, 1)
        img = psnr(x_tiled, x_full, 2.0)
        del x_full, x_tiled, z_full
        gc.collect()
        row = {"side": side, "latent_psnr_db": _db(lat), "image_psnr_db": _db(img),
               "tiles_per_axis": len(range(0, side, tiling.stride)) if side > tiling.tile else 1,
               "seconds": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(peak_rss_gib(), 2)}
        result["rows"].append(row)
        print(f"{side:>6}  {lat:>14.2f}  {img:>13.2f}  {row['seconds']:>7.1f}  {row['peak_rss_gib']:>12.2f}",
              flush=True)
        if args.out:  # rewritten after every size, so a killed run keeps what it measured
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
