"""The edit pipeline: thin orchestration over packing, text conditioning, backends and the scheduler.

``Pipeline.from_pretrained(model_dir, backend="torch")`` runs diffusers' modules; ``Pipeline.from_artifacts(art)``
runs exported graphs (ONNX Runtime, TensorRT). With ``policy="per-image"`` and the same components, latents and
embeddings, the output reproduces diffusers' pipeline class of the model folder (``QwenImageEditPlusPipeline`` or
``QwenImageEditPipeline``, see ``pipeline_classes.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import latents as lat
from .backends.base import Backend, backend_factory
from .errors import InputError
from .graphs import DIT, VAE_DECODER, VAE_ENCODER
from .images import from_model_output, load_images, to_model_input, to_pil
from .manifest import Manifest, ModelConfig
from .model_checks import resolve_pipeline_class
from .packing import POLICIES, PackedLayout, budget_pixels, pack_references
from .pipeline_classes import EDIT_PLUS
from .pipeline_classes import pipeline_class as pipeline_class_info
from .rope import RopeCache, RopeConfig, modulation_index
from .scheduler import FlowMatchEulerConfig, FlowMatchEulerScheduler
from .text import CONDITION_IMAGE_AREA, QwenPromptEncoder
from .tiling import VaeTiling, tiled_decode, tiled_encode

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int, float], None]  # (step index, total steps, seconds of this step)


@dataclass
class StageTimes:
    """Seconds spent per stage in the last call (for profiling)."""

    text_encode: float = 0.0
    vae_encode: float = 0.0
    pack_rope: float = 0.0
    dit: list[float] = field(default_factory=list)
    scheduler: float = 0.0
    vae_decode: float = 0.0
    total: float = 0.0


def trim_text_padding(embeds: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop trailing masked text tokens [1, L, D] / [1, L]: the DiT's output is the same without them.

    Masked keys get no attention weight, so those tokens never reach an image token, and text RoPE positions
    count from the start, so the kept tokens keep theirs. Masked tokens inside the prompt are kept.
    """
    kept = np.flatnonzero(mask[0])
    if kept.size == 0:
        raise InputError("The prompt embedding mask masks every token.", "pass a mask with at least one True.")
    end = int(kept[-1]) + 1
    return embeds[:, :end], mask[:, :end]


class Pipeline:
    """Multi-reference image edit over interchangeable backends.

    Args:
        config: the model configuration (transformer/VAE/scheduler configs, text encoder location).
        backends: one ``Backend`` per graph name ("dit", "vae_encoder", "vae_decoder").
        text_encoder: a ``QwenPromptEncoder`` or None (then pass ``prompt_embeds``).
        budgets: pixel budgets this pipeline may run; None allows any (torch backend).
    """

    def __init__(self, config: ModelConfig, backends: dict[str, Backend], text_encoder: QwenPromptEncoder | None = None,
                 budgets: Sequence[int] | None = None):
        self.config = config
        self.backends = backends
        self.text_encoder = text_encoder
        self.budgets = tuple(budget_pixels(b) for b in budgets) if budgets else None
        self.pipeline_class = pipeline_class_info(config.pipeline_class)
        self.rope = RopeCache(RopeConfig.from_transformer_config(config.transformer))
        self.scheduler_config = FlowMatchEulerConfig.from_dict(config.scheduler)
        self.latents_mean = np.asarray(config.vae["latents_mean"], dtype=np.float32)
        self.latents_std = np.asarray(config.vae["latents_std"], dtype=np.float32)
        self.vae_tiling = VaeTiling.from_vae_config(config.vae)
        self._vae_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.vae_cache_size = 32
        self.last_times = StageTimes()
        self.last_layout: PackedLayout | None = None

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, backend: str = "torch", torch_dtype: str = "float32",
                        condition_image_area: int = CONDITION_IMAGE_AREA, load_text_encoder: bool = True,
                        pipeline_class: str | None = None, text_encoder_dtype: str = "auto") -> Pipeline:
        """A pipeline over a diffusers-format folder, running diffusers' modules (``backend="torch"``).

        ``pipeline_class`` serves the folder as that diffusers class (default: its ``model_index.json``);
        ``text_encoder_dtype`` is "auto" (bf16 where the GPU/CPU supports it), "bfloat16" or "float32".
        """
        if backend != "torch":
            raise InputError(
                f"from_pretrained runs the torch backend, not '{backend}'.",
                "export the model (`uniref-deploy export`) and use Pipeline.from_artifacts for ort/trt.",
            )
        config = ModelConfig.from_diffusers_dir(model_dir, pipeline_class, text_encoder_dtype)
        backends = backend_factory("torch").create(config, model_dir, dtype=torch_dtype)
        text = _text_encoder(config, condition_image_area) if load_text_encoder else None
        return cls(config, backends, text)

    @classmethod
    def from_artifacts(cls, art_dir: str | os.PathLike, backend: str = "auto", precision: str | None = None,
                       condition_image_area: int = CONDITION_IMAGE_AREA, load_text_encoder: bool = True,
                       pipeline_class: str | None = None, text_encoder_dtype: str | None = None,
                       **backend_options) -> Pipeline:
        """A pipeline over an artifact folder written by ``uniref-deploy export``/``compile``.

        ``precision`` picks the DiT graph/engines: None means fp32 on ONNX Runtime, the fastest built
        precision on TensorRT (fp16, bf16, fp8, then fp32) and the measured choice per graph on OpenVINO.
        ``backend="auto"`` follows the rule of ``backends/auto.py``. ``pipeline_class`` and ``text_encoder_dtype``
        override the values the export recorded in the manifest.
        """
        manifest = Manifest.load(art_dir)
        if backend == "auto":
            backend = _auto_backend(manifest)
        backends = backend_factory(backend).create(manifest.model, Path(art_dir), manifest=manifest,
                                                   precision=precision, **backend_options)
        config = manifest.model
        if pipeline_class is not None:
            config = dataclasses.replace(config, pipeline_class=resolve_pipeline_class(art_dir, {}, pipeline_class))
        if text_encoder_dtype is not None:
            config = dataclasses.replace(config, text_encoder_dtype=text_encoder_dtype)
        if config.text_encoder_dir and not Path(config.text_encoder_dir).is_absolute():
            config = dataclasses.replace(config, text_encoder_dir=str(Path(art_dir) / config.text_encoder_dir))
        text = _text_encoder(config, condition_image_area) if load_text_encoder else None
        return cls(config, backends, text, budgets=manifest.budgets or None)

    # ---- the call -----------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | None = None,
        image: Sequence | None = None,
        negative_prompt: str | None = None,
        true_cfg_scale: float = 4.0,
        num_inference_steps: int = 50,
        budget: int = 1024 * 1024,
        policy: str = "self",
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        prompt_embeds_mask: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds_mask: np.ndarray | None = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
    ) -> Image.Image | np.ndarray:
        """Edit: returns a PIL image, or float32 HWC in [0, 1] with ``output_type="np"``, or packed latents
        [1, S_target, 4z] with ``output_type="latent"``.

        Zero references is plain text-to-image generation and needs ``width`` and ``height``.
        """
        t_start = time.perf_counter()
        times = StageTimes()
        # 1. check inputs, read the references
        self.check_inputs(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, num_inference_steps,
                          policy, output_type, budget)
        images = load_images(image or [])
        self._check_references(len(images))
        do_cfg = true_cfg_scale > 1.0 and (negative_prompt is not None or negative_prompt_embeds is not None)

        # 2. pack the references into the budget
        t0 = time.perf_counter()
        layout = pack_references([im.size for im in images], budget_pixels(budget), policy, width, height)
        self.last_layout = layout
        times.pack_rope += time.perf_counter() - t0

        # 3. text conditioning
        t0 = time.perf_counter()
        sizes = [(slot.width, slot.height) for slot in layout.references]
        cond = self._embeds(prompt, images, sizes, prompt_embeds, prompt_embeds_mask)
        uncond = (self._embeds(negative_prompt, images, sizes, negative_prompt_embeds, negative_prompt_embeds_mask)
                  if do_cfg else None)
        times.text_encode = time.perf_counter() - t0

        # 4. VAE-encode the references (cached by content) into packed tokens
        t0 = time.perf_counter()
        ref_tokens = [self._encode_reference(im, slot.width, slot.height) for im, slot in zip(images, layout.references, strict=True)]
        times.vae_encode = time.perf_counter() - t0

        # 5. initial latents
        z = self.config.latent_channels
        tgt = layout.target
        n_target = layout.num_target_tokens
        if latents is None:
            latents = lat.initial_noise(seed, z, tgt.latent_h, tgt.latent_w)
        elif latents.shape != (1, n_target, 4 * z):
            raise InputError(f"latents have shape {latents.shape}, expected (1, {n_target}, {4 * z}) for this layout.")
        latents = latents.astype(np.float32)

        # 6. RoPE tables and the static DiT feeds
        t0 = time.perf_counter()
        static = [self._static_feeds(layout, e, m) for e, m in ([cond] + ([uncond] if do_cfg else []))]
        times.pack_rope += time.perf_counter() - t0

        # 7. timesteps (dynamic shift from the TARGET token count)
        scheduler = FlowMatchEulerScheduler(self.scheduler_config)
        scheduler.set_timesteps(num_inference_steps, image_seq_len=n_target)

        # 8. denoise
        dit = self.backends[DIT]
        for i, t in enumerate(scheduler.timesteps):
            t_step = time.perf_counter()
            model_in = np.concatenate([latents, *ref_tokens], axis=1) if ref_tokens else latents
            timestep = np.full((1,), t / 1000.0, dtype=np.float32)
            preds = [dit.infer({**s, "hidden_states": model_in, "timestep": timestep})["velocity"][:, :n_target]
                     for s in static]
            times.dit.append(time.perf_counter() - t_step)
            t0 = time.perf_counter()
            velocity = cfg_combine(preds[0], preds[1], true_cfg_scale) if do_cfg else preds[0]
            latents = scheduler.step(velocity, i, latents)
            times.scheduler += time.perf_counter() - t0
            if callback is not None:
                callback(i, len(scheduler.timesteps), time.perf_counter() - t_step)

        if output_type == "latent":
            times.total = time.perf_counter() - t_start
            self.last_times = times
            return latents

        # 9. decode
        t0 = time.perf_counter()
        latent = lat.denormalize(lat.unpack(latents, tgt.latent_h, tgt.latent_w), self.latents_mean, self.latents_std)
        decoded = self._vae(VAE_DECODER, latent)
        out = from_model_output(np.clip(decoded, -1.0, 1.0))
        times.vae_decode = time.perf_counter() - t0
        times.total = time.perf_counter() - t_start
        self.last_times = times
        return out if output_type == "np" else to_pil(out)

    # ---- steps --------------------------------------------------------------------------------------------
    def check_inputs(self, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, steps, policy,
                     output_type, budget) -> None:
        """Reject inconsistent or unsupported arguments with a one-line message."""
        if (prompt is None) == (prompt_embeds is None):
            raise InputError("Pass exactly one of prompt and prompt_embeds.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise InputError("Pass at most one of negative_prompt and negative_prompt_embeds.")
        if prompt is not None and not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}.", "run one prompt per call.")
        if not isinstance(steps, int) or steps < 1:
            raise InputError(f"num_inference_steps must be a positive integer, got {steps!r}.")
        if policy not in POLICIES:
            raise InputError(f"Unknown packing policy '{policy}'.", f"use one of {', '.join(POLICIES)}.")
        if output_type not in ("pil", "np", "latent"):
            raise InputError(f"Unknown output_type '{output_type}'.", "use 'pil', 'np' or 'latent'.")
        if self.budgets is not None and budget_pixels(budget) not in self.budgets:
            have = ", ".join(f"{int(round(b ** 0.5))}" for b in self.budgets)
            raise InputError(
                f"Budget {budget} was not compiled into these artifacts (compiled: {have}).",
                f"use one of {have}, or re-run the export with --budgets including it.",
            )

    def _check_references(self, count: int) -> None:
        """Refuse a reference count the pipeline class does not take (Qwen-Image-Edit: exactly one)."""
        cls = self.pipeline_class
        if count < cls.min_references or (cls.max_references is not None and count > cls.max_references):
            want = (f"exactly {cls.min_references}" if cls.min_references == cls.max_references
                    else f"at least {cls.min_references}")
            raise InputError(f"{cls.name} takes {want} reference image(s), got {count}.",
                             f"pass {want} --image, or use a {EDIT_PLUS} model for several references.")

    def _embeds(self, prompt, images, sizes, embeds, mask) -> tuple[np.ndarray, np.ndarray]:
        if embeds is None:
            if self.text_encoder is None:
                raise InputError(
                    "No text encoder is available for this model.",
                    "pass prompt_embeds (and negative_prompt_embeds), or use a model folder with text_encoder/.",
                )
            return trim_text_padding(*self.text_encoder.encode(prompt, images, sizes))
        embeds = np.asarray(embeds, dtype=np.float32)
        if embeds.ndim == 2:
            embeds = embeds[None]
        if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != self.config.text_hidden_size:
            raise InputError(
                f"prompt_embeds have shape {embeds.shape}, expected (1, L, {self.config.text_hidden_size}).")
        limit = self.pipeline_class.max_text_tokens
        if embeds.shape[1] > limit:
            raise InputError(f"prompt_embeds have {embeds.shape[1]} tokens, over the limit of {limit}.",
                             "shorten the prompt.")
        mask = np.ones(embeds.shape[:2], dtype=bool) if mask is None else np.asarray(mask).astype(bool).reshape(embeds.shape[:2])
        return trim_text_padding(embeds, mask)

    def _vae(self, name: str, x: np.ndarray) -> np.ndarray:
        """Run the VAE encoder (image -> latent) or decoder (latent -> image), in tiles when the manifest says so."""
        key, out = ("image", "latent") if name == VAE_ENCODER else ("latent", "image")
        backend = self.backends[name]

        def run(t: np.ndarray) -> np.ndarray:
            return backend.infer({key: t})[out]

        if self.vae_tiling is None:
            return run(x)
        tiled = tiled_encode if name == VAE_ENCODER else tiled_decode
        return tiled(run, x, self.vae_tiling, self.config.vae_scale_factor)

    def _encode_reference(self, img: Image.Image, width: int, height: int) -> np.ndarray:
        key = hashlib.sha256(img.tobytes() + f"{img.size}->{width}x{height}".encode()).hexdigest()
        if key in self._vae_cache:
            self._vae_cache.move_to_end(key)
            return self._vae_cache[key]
        latent = self._vae(VAE_ENCODER, to_model_input(img, width, height))
        tokens = lat.pack(lat.normalize(latent, self.latents_mean, self.latents_std))
        self._vae_cache[key] = tokens
        if len(self._vae_cache) > self.vae_cache_size:
            self._vae_cache.popitem(last=False)
        return tokens

    def _static_feeds(self, layout: PackedLayout, embeds: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        tables = self.rope.tables(layout.grids, embeds.shape[1])
        feeds = {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask, **tables}
        if self.config.zero_cond_t:
            feeds["modulate_index"] = modulation_index(layout.grids)
        return feeds

    def close(self) -> None:
        for b in self.backends.values():
            b.deactivate()


def cfg_combine(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """True CFG with diffusers' norm rescale: the guided velocity keeps the conditional one's per-token norm."""
    comb = uncond + scale * (cond - uncond)
    cond_norm = np.linalg.norm(cond, axis=-1, keepdims=True)
    comb_norm = np.linalg.norm(comb, axis=-1, keepdims=True)
    return (comb * (cond_norm / comb_norm)).astype(np.float32)


def _text_encoder(config: ModelConfig, condition_area: int) -> QwenPromptEncoder | None:
    if config.text_encoder_dir and Path(config.text_encoder_dir, "text_encoder").is_dir():
        return QwenPromptEncoder(config.text_encoder_dir, condition_area=condition_area,
                                 dtype=config.text_encoder_dtype, pipeline=pipeline_class_info(config.pipeline_class))
    return None


def _auto_backend(manifest: Manifest) -> str:
    """The fastest installed backend for this machine (the measured rule in ``backends/auto.py``)."""
    from .backends.auto import choose_backend

    return choose_backend(manifest)
