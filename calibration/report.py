"""Accuracy of the FP8 DiT against fp32: full denoising runs per bucket, per-step velocity cosine, PSNRs, a plot.

Both precisions start from the same noise, references and text embeddings and run their own trajectory (what a
user would see); the cosine at step i compares the two runs' velocities at that step. The final latents are
compared by PSNR with the fp32 latent's max |value| as peak, the images (decoded by the fp32 VAE decoder, in
[0, 1]) by PSNR with peak 1.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from uniref_deploy.runtime import latents as lat
from uniref_deploy.runtime.backends.base import Backend
from uniref_deploy.runtime.compare import compare, psnr
from uniref_deploy.runtime.fileio import atomic_path, atomic_write_text
from uniref_deploy.runtime.images import from_model_output
from uniref_deploy.runtime.packing import max_references, pack_references
from uniref_deploy.runtime.scheduler import FlowMatchEulerScheduler

from .dataset import CalibrationSet, procedural_images

logger = logging.getLogger(__name__)


def denoise(dit: Backend, static: dict[str, np.ndarray], noise: np.ndarray, refs: list[np.ndarray],
            scheduler: FlowMatchEulerScheduler) -> tuple[np.ndarray, list[np.ndarray]]:
    """Euler loop without CFG; returns the final packed latents and the velocity of every step."""
    latents, velocities = noise, []
    n = noise.shape[1]
    for i, t in enumerate(scheduler.timesteps):
        feeds = {**static, "hidden_states": np.concatenate([latents, *refs], axis=1),
                 "timestep": np.full((1,), t / 1000.0, dtype=np.float32)}
        v = dit.infer(feeds)["velocity"][:, :n]
        velocities.append(v)
        latents = scheduler.step(v, i, latents)
    return latents, velocities


def bucket_accuracy(calset: CalibrationSet, bucket: int, fp32: Backend, fp8: Backend, decoder: Backend,
                    steps: int, seed: int) -> dict:
    """One edit (up to 3 procedural references, a 64-token random prompt) denoised at both precisions."""
    rng = np.random.default_rng(seed + bucket)
    config = calset.config
    pool = procedural_images(count=4, seed=seed + 1)
    pixels = min(bucket, calset.spec.max_pixels)
    refs = pool[: min(3, max_references(pixels))]
    layout = pack_references([im.size for im in refs], pixels, "self")
    tgt = layout.target
    vae = calset.vae_encoder()
    try:
        ref_tokens = [calset._encode(vae, im, s.width, s.height) for im, s in zip(refs, layout.references, strict=True)]
    finally:
        vae.deactivate()
    text = rng.standard_normal((1, 64, config.text_hidden_size), dtype=np.float32)
    static = {"encoder_hidden_states": text, "encoder_hidden_states_mask": np.ones((1, 64), dtype=bool),
              **calset.rope.tables(layout.grids, 64)}
    noise = lat.initial_noise(seed, config.latent_channels, tgt.latent_h, tgt.latent_w)
    results = {}
    for name, dit in (("fp32", fp32), ("fp8", fp8)):
        sched = FlowMatchEulerScheduler(calset.scheduler_config)
        sched.set_timesteps(steps, image_seq_len=layout.num_target_tokens)
        results[name] = denoise(dit, static, noise, ref_tokens, sched)
    cos = [compare("velocity", b, a).cosine for a, b in zip(results["fp32"][1], results["fp8"][1], strict=True)]
    images = {}
    for name, (final, _) in results.items():
        latent = lat.denormalize(lat.unpack(final, tgt.latent_h, tgt.latent_w), calset.mean, calset.std)
        images[name] = from_model_output(np.clip(decoder.infer({"latent": latent})["image"], -1.0, 1.0))
    ref_latent = results["fp32"][0]
    return {
        "bucket": bucket,
        "target": [tgt.width, tgt.height],
        "image_tokens": layout.num_image_tokens,
        "steps": steps,
        "cosine_per_step": [round(c, 6) for c in cos],
        "cosine_min": round(min(cos), 6),
        "cosine_mean": round(float(np.mean(cos)), 6),
        "latent_psnr_db": round(psnr(results["fp8"][0], ref_latent, float(np.abs(ref_latent).max())), 2),
        "image_psnr_db": round(psnr(images["fp8"], images["fp32"]), 2),
    }


def write_report(out_dir: str | os.PathLike, report: dict) -> tuple[Path, Path | None]:
    """``report.json`` and (when matplotlib imports) ``report.png`` under ``out_dir``, written atomically."""
    out = Path(out_dir)
    json_path = out / "report.json"
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping report.png (pip install 'uniref-deploy[plots]')")
        return json_path, None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for b in report["buckets"]:
        side = int(round(b["bucket"] ** 0.5))
        ax.plot(range(1, len(b["cosine_per_step"]) + 1), b["cosine_per_step"], marker="o", ms=3,
                label=f"bucket {side}² (target {b['target'][0]}x{b['target'][1]}): latent {b['latent_psnr_db']} dB, "
                      f"image {b['image_psnr_db']} dB")
    ax.axhline(0.99, color="grey", ls="--", lw=1, label="0.99")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("cosine(velocity fp8, fp32)")
    ax.set_title(f"FP8 DiT vs fp32 ({report['settings']['scales']}, attention fp8: "
                 f"{report['settings']['fp8_attention']})", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = out / "report.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return json_path, png


ProgressFn = Callable[[str], None]
