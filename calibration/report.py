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
from pathlib import Path

import numpy as np

from uniref_deploy.runtime import latents as lat
from uniref_deploy.runtime.artifacts import CALIBRATION_PLOT, CALIBRATION_REPORT
from uniref_deploy.runtime.backends.base import Backend
from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.compare import compare, psnr
from uniref_deploy.runtime.denoise import denoise
from uniref_deploy.runtime.fileio import atomic_path, atomic_write_text
from uniref_deploy.runtime.graphs import dit_static_feeds
from uniref_deploy.runtime.images import from_model_output
from uniref_deploy.runtime.packing import max_references, pack_references
from uniref_deploy.runtime.scheduler import FlowMatchEulerScheduler

from .dataset import CalibrationSet, procedural_images

logger = logging.getLogger(__name__)


def bucket_accuracy(calset: CalibrationSet, bucket: Budget, fp32: Backend, fp8: Backend, decoder: Backend,
                    steps: int, seed: int) -> dict:
    """One edit (up to 3 procedural references, a 64-token random prompt) denoised at both precisions."""
    return bucket_accuracies(calset, bucket, fp32, {"fp8": fp8}, decoder, steps, seed)["fp8"]


def bucket_accuracies(calset: CalibrationSet, bucket: Budget, fp32: Backend, candidates: dict[str, Backend],
                      decoder: Backend, steps: int, seed: int) -> dict[str, dict]:
    """``bucket_accuracy`` for several quantised DiTs against one fp32 run: candidate name -> its figures."""
    rng = np.random.default_rng(seed + bucket.pixels)
    config = calset.config
    pool = procedural_images(count=4, seed=seed + 1)
    budget = calset.sample_budget(bucket)
    refs = pool[: min(3, max_references(budget))]
    layout = pack_references([im.size for im in refs], budget, "self")
    tgt = layout.target
    vae = calset.vae_encoder()
    try:
        ref_tokens = [calset.encode_reference(vae, im, s.width, s.height)
                      for im, s in zip(refs, layout.references, strict=True)]
    finally:
        vae.deactivate()
    text = rng.standard_normal((1, 64, config.text_hidden_size), dtype=np.float32)
    static = dit_static_feeds(config, calset.rope, layout, text, np.ones((1, 64), dtype=bool))
    noise = lat.initial_noise(seed, config.latent_channels, tgt.latent_h, tgt.latent_w)

    def run(dit: Backend):
        sched = FlowMatchEulerScheduler(calset.scheduler_config)
        sched.set_timesteps(steps, image_seq_len=layout.num_target_tokens)
        result = denoise(dit, [static], noise, ref_tokens, sched, keep_velocities=True)
        latent = lat.denormalize(lat.unpack(result.latents, tgt.latent_h, tgt.latent_w), calset.mean, calset.std)
        return result, from_model_output(np.clip(decoder.infer({"latent": latent})["image"], -1.0, 1.0))

    ref, ref_image = run(fp32)
    peak = float(np.abs(ref.latents).max())
    out = {}
    for name, dit in candidates.items():
        got, image = run(dit)
        dit.deactivate()  # one candidate in memory at a time
        cos = [compare("velocity", b, a).cosine for a, b in zip(ref.velocities, got.velocities, strict=True)]
        out[name] = {
            "bucket": bucket.pixels,
            "target": [tgt.width, tgt.height],
            "image_tokens": layout.num_image_tokens,
            "steps": steps,
            "cosine_per_step": [round(c, 6) for c in cos],
            "cosine_min": round(min(cos), 6),
            "cosine_mean": round(float(np.mean(cos)), 6),
            "latent_psnr_db": round(psnr(got.latents, ref.latents, peak), 2),
            "image_psnr_db": round(psnr(image, ref_image), 2),
        }
    return out


def write_report(art_dir: str | os.PathLike, report: dict) -> tuple[Path, Path | None]:
    """``calibration/report.json`` and (when matplotlib imports) ``report.png`` under ``art_dir``, atomically."""
    art = Path(art_dir)
    json_path = art / CALIBRATION_REPORT
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
        ax.plot(range(1, len(b["cosine_per_step"]) + 1), b["cosine_per_step"], marker="o", ms=3,
                label=f"bucket {Budget.from_pixels(b['bucket'])} (target {b['target'][0]}x{b['target'][1]}): latent {b['latent_psnr_db']} dB, "
                      f"image {b['image_psnr_db']} dB")
    ax.axhline(0.99, color="grey", ls="--", lw=1, label="0.99")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("cosine(velocity fp8, fp32)")
    ax.set_title(f"FP8 DiT vs fp32 ({report['settings']['scales']}, attention fp8: "
                 f"{report['settings']['fp8_attention']})", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = art / CALIBRATION_PLOT
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return json_path, png

