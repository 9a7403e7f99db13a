"""Calibration samples that look like production DiT calls: SELF-packed references, varied prompts and steps.

For every compiled bucket, each sample packs 1-4 references of varied aspects with ``pack_references`` (policy
``self``), VAE-encodes them with the fp32 ``vae_encoder`` graph, and builds the noisy target the way the
denoising loop sees it at a timestep drawn from the real schedule (``FlowMatchEulerScheduler`` at the layout's
target token count, stratified over the whole trajectory): ``x_t = (1 - sigma) * x0 + sigma * noise``, ``x0``
being the VAE latent of the last reference resized to the target. Text conditioning is random normal
embeddings of the model's text hidden size (8..``max_text`` tokens), so no text encoder or torch is needed.

On CPU the sequence is kept modest: each bucket is packed at ``min(bucket, max_pixels)`` pixels (512x512 by
default: at most 1024 target + 1024 reference tokens).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from uniref_deploy.runtime import latents as lat
from uniref_deploy.runtime.backends.ort import OrtBackend
from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.errors import CalibrationError, InputError
from uniref_deploy.runtime.fileio import sha256_file, sha256_json
from uniref_deploy.runtime.graphs import VAE_ENCODER, dit_static_feeds
from uniref_deploy.runtime.images import load_image, to_model_input
from uniref_deploy.runtime.manifest import Manifest
from uniref_deploy.runtime.packing import max_references, pack_references
from uniref_deploy.runtime.rope import RopeCache, RopeConfig
from uniref_deploy.runtime.scheduler import FlowMatchEulerConfig, FlowMatchEulerScheduler

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3), (21, 9))


@dataclass(frozen=True)
class DatasetSpec:
    """What a calibration set is made of (its fingerprint is part of the calibrate stage's input hash).

    Args:
        samples (int): number of samples over all buckets (round-robin).
        images (str | None): folder of reference images; None uses the built-in procedural set.
        seed (int): numpy seed for every random choice.
        max_pixels (int, default 512*512): cap on the packing budget per sample (CPU-friendly sequences).
        max_text (int, default 128): longest random prompt, in tokens.
        steps (int, default 28): schedule length the timesteps are drawn from.
    """

    samples: int = 16
    images: str | None = None
    seed: int = 0
    max_pixels: int = 512 * 512
    max_text: int = 128
    steps: int = 28


@dataclass(frozen=True)
class CalibrationSample:
    """One DiT call: its feeds and how it was drawn."""

    feeds: dict
    bucket: Budget
    num_references: int
    text_tokens: int
    image_tokens: int
    step: int
    sigma: float


# ---- reference images ---------------------------------------------------------------------------------------


def procedural_images(count: int = 12, seed: int = 0) -> list[Image.Image]:
    """Gradients, checkerboards, noise and shapes at varied aspects (numpy-generated, deterministic)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        aw, ah = ASPECTS[i % len(ASPECTS)]
        scale = rng.uniform(320, 720) / max(aw, ah)
        w, h = max(32, int(aw * scale)), max(32, int(ah * scale))
        kind = i % 4
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        if kind == 0:  # two-colour gradient
            c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            t = ((xx / w + yy / h) / 2)[..., None]
            arr = c0 * (1 - t) + c1 * t
        elif kind == 1:  # checkerboard
            cell = int(rng.integers(8, 64))
            mask = (((xx // cell) + (yy // cell)) % 2)[..., None]
            arr = rng.uniform(0, 255, 3) * mask + rng.uniform(0, 255, 3) * (1 - mask)
        elif kind == 2:  # smooth coloured noise
            small = rng.uniform(0, 255, (max(2, h // 32), max(2, w // 32), 3)).astype(np.uint8)
            arr = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.float32)
            arr = arr + rng.normal(0, 12, arr.shape)
        else:  # shapes on a flat background
            img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 255, 3)))
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(3, 9))):
                x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
                x1, y1 = int(rng.integers(x0 + 4, w)), int(rng.integers(y0 + 4, h))
                fill = tuple(int(v) for v in rng.integers(0, 255, 3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
            arr = np.asarray(img, np.float32)
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"))
    return out


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder``, sorted.

    Raises:
        InputError: the folder is missing or holds no images.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"Calibration image folder '{root}' does not exist.", "pass an existing --images DIR.")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"'{root}' holds no images ({', '.join(IMAGE_SUFFIXES)}).",
                               "add a few reference images or drop --images to use the built-in set.")
    return files


def fingerprint(spec: DatasetSpec, manifest: Manifest) -> str:
    """sha256 of everything the samples depend on: the spec, the image files, buckets, the VAE encoder graph."""
    images = [sha256_file(p) for p in image_files(spec.images)] if spec.images else "procedural-v1"
    vae = manifest.graph(VAE_ENCODER, "fp32").sha256
    return sha256_json({"spec": spec.__dict__ | {"images": None}, "images": images, "budgets": [b.pixels for b in manifest.budgets],
                        "vae": vae, "model": manifest.model.transformer})


# ---- samples -------------------------------------------------------------------------------------------------


class CalibrationSet:
    """Builds ``CalibrationSample``s lazily (the VAE encoder session lives only while iterating).

    Args:
        manifest: the artifact manifest (buckets, model config, the fp32 ``vae_encoder`` graph).
        art_dir: the artifact folder.
        spec: what to draw.
    """

    def __init__(self, manifest: Manifest, art_dir: str | os.PathLike, spec: DatasetSpec):
        if spec.samples < 1:
            raise CalibrationError(f"The calibration set needs at least 1 sample, got {spec.samples}.")
        self.manifest, self.art_dir, self.spec = manifest, Path(art_dir), spec
        self.config = manifest.model
        self.rope = RopeCache(RopeConfig.from_transformer_config(self.config.transformer))
        self.scheduler_config = FlowMatchEulerConfig.from_dict(self.config.scheduler)
        self.mean = np.asarray(self.config.vae["latents_mean"], np.float32)
        self.std = np.asarray(self.config.vae["latents_std"], np.float32)
        self.buckets = manifest.budgets or (Budget.from_side(1024),)

    def __len__(self) -> int:
        return self.spec.samples

    def images(self) -> list[Image.Image]:
        if self.spec.images:
            return [load_image(p) for p in image_files(self.spec.images)]
        return procedural_images(seed=self.spec.seed)

    def __iter__(self) -> Iterator[CalibrationSample]:
        return self.iterate()

    def iterate(self, progress: Callable[[int], None] | None = None) -> Iterator[CalibrationSample]:
        rng = np.random.default_rng(self.spec.seed)
        pool = self.images()
        vae = self.vae_encoder()
        try:
            for i in range(self.spec.samples):
                yield self._sample(i, rng, pool, vae)
                if progress is not None:
                    progress(i)
        finally:
            vae.deactivate()

    def vae_encoder(self) -> OrtBackend:
        """An activated ORT session of the fp32 VAE encoder (the caller deactivates it)."""
        return OrtBackend(self.manifest.graph(VAE_ENCODER, "fp32"), self.art_dir).activate()

    def sample_budget(self, bucket: Budget) -> Budget:
        """The packing budget of samples drawn for ``bucket``: the bucket, capped at ``spec.max_pixels``."""
        return min(bucket, Budget.from_pixels(self.spec.max_pixels))

    def encode_reference(self, vae: OrtBackend, img: Image.Image, width: int, height: int) -> np.ndarray:
        """``img`` at ``width`` x ``height`` through the VAE encoder, normalised and packed into tokens."""
        latent = vae.infer({"image": to_model_input(img, width, height)})["latent"]
        return lat.pack(lat.normalize(latent, self.mean, self.std))  # [1, tokens, 4z]

    def _sample(self, i: int, rng: np.random.Generator, pool: list[Image.Image], vae: OrtBackend) -> CalibrationSample:
        bucket = self.buckets[i % len(self.buckets)]
        budget = self.sample_budget(bucket)
        n_refs = int(rng.integers(1, min(4, max_references(budget)) + 1))
        refs = [pool[int(k)] for k in rng.choice(len(pool), size=n_refs, replace=n_refs > len(pool))]
        layout = pack_references([im.size for im in refs], budget, "self")
        tgt = layout.target
        # timestep from the real schedule, stratified over the trajectory
        sched = FlowMatchEulerScheduler(self.scheduler_config)
        sched.set_timesteps(self.spec.steps, image_seq_len=layout.num_target_tokens)
        step = min(self.spec.steps - 1, int((i + rng.random()) / self.spec.samples * self.spec.steps))
        sigma = float(sched.sigmas[step])
        x0 = self.encode_reference(vae, refs[-1], tgt.width, tgt.height)
        noise = lat.initial_noise(int(rng.integers(2**31)), self.config.latent_channels, tgt.latent_h, tgt.latent_w)
        x_t = ((1.0 - sigma) * x0 + sigma * noise).astype(np.float32)
        ref_tokens = [self.encode_reference(vae, im, s.width, s.height) for im, s in zip(refs, layout.references, strict=True)]
        text_len = int(rng.integers(8, self.spec.max_text + 1))
        embeds = rng.standard_normal((1, text_len, self.config.text_hidden_size), dtype=np.float32)
        static = dit_static_feeds(self.config, self.rope, layout, embeds, np.ones((1, text_len), dtype=bool))
        feeds = {
            "hidden_states": np.concatenate([x_t, *ref_tokens], axis=1),
            "timestep": np.full((1,), float(sched.timesteps[step]) / 1000.0, dtype=np.float32),
            **{k: np.ascontiguousarray(v) for k, v in static.items()},
        }
        return CalibrationSample(feeds, bucket, n_refs, text_len, layout.num_image_tokens, step, sigma)


def feeds_digest(samples: list[CalibrationSample]) -> str:
    """sha256 over every feed array of ``samples`` (names, shapes and bytes)."""
    h = hashlib.sha256()
    for s in samples:
        for name in sorted(s.feeds):
            arr = np.ascontiguousarray(s.feeds[name])
            h.update(f"{name}{arr.shape}{arr.dtype}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()
