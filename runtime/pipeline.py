"""The edit pipeline: thin orchestration over packing, text conditioning, backends and the scheduler.

``Pipeline.from_pretrained(model_dir, backend="torch")`` runs diffusers' modules; ``Pipeline.from_artifacts(art)``
runs exported graphs (ONNX Runtime, TensorRT). With ``policy="per-image"`` and the same components, latents and
embeddings, the output reproduces diffusers' pipeline class of the model folder (``QwenImageEditPlusPipeline`` or
``QwenImageEditPipeline``, see ``pipeline_classes.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import operator
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import latents as lat
from .backends.base import Backend, backend_factory
from .budget import Budget, trained_budgets
from .denoise import StepCallback, cfg_combine, denoise
from .errors import InputError, ManifestError
from .graphs import DIT, VAE_DECODER, VAE_ENCODER, dit_static_feeds
from .images import from_model_output, image_digest, load_images, to_model_input, to_pil
from .manifest import Manifest, ModelConfig
from .model_checks import resolve_pipeline_class
from .packing import POLICIES, PackedLayout, as_budget, pack_references
from .pipeline_classes import EDIT_PLUS
from .pipeline_classes import pipeline_class as pipeline_class_info
from .rope import RopeCache, RopeConfig
from .scheduler import FlowMatchEulerConfig, FlowMatchEulerScheduler
from .text import CONDITION_IMAGE_AREA, QwenPromptEncoder
from .tiling import VaeTiling, tiled_decode, tiled_encode

logger = logging.getLogger(__name__)

__all__ = ["Pipeline", "StageTimes", "StepCallback", "cfg_combine", "trim_text_padding"]


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
        budgets: the compiled budgets; a request may use any budget up to the largest (the graphs are dynamic),
            or exactly one of them when a backend runs fixed buckets (TensorRT). None allows any (torch backend).
    """

    def __init__(self, config: ModelConfig, backends: dict[str, Backend], text_encoder: QwenPromptEncoder | None = None,
                 budgets: Sequence[Budget | int] | None = None):
        self.config = config
        self.backends = backends
        self.text_encoder = text_encoder
        self.budgets = tuple(sorted(Budget.coerce(b) for b in budgets)) if budgets else None
        self.exact_buckets = any(b.fixed_buckets for b in backends.values())
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
        FlowMatchEulerConfig.from_dict(config.scheduler)  # a config we cannot run fails before any weight loads
        backends = backend_factory("torch").create(config, model_dir, dtype=torch_dtype)
        text = _text_encoder(config, condition_image_area) if load_text_encoder else None
        return cls(config, backends, text)

    @classmethod
    def from_artifacts(cls, art_dir: str | os.PathLike, backend: str = "auto", precision: str | None = None,
                       condition_image_area: int = CONDITION_IMAGE_AREA, load_text_encoder: bool = True,
                       pipeline_class: str | None = None, text_encoder_dtype: str | None = None,
                       text_positions: str = "mrope", **backend_options) -> Pipeline:
        """A pipeline over an artifact folder written by ``uniref-deploy export``/``compile``.

        ``precision`` picks the DiT graph/engines: None means fp32 on ONNX Runtime, the fastest built
        precision on TensorRT (fp16, bf16, fp8, then fp32) and the measured choice per graph on OpenVINO.
        ``backend="auto"`` follows the rule of ``backends/auto.py``. ``pipeline_class`` and ``text_encoder_dtype``
        override the values the export recorded in the manifest. Artifacts with the compiled text graphs encode
        prompts without torch (``text_onnx.py``); ``text_positions`` is their M-RoPE mode: "mrope" (3-D, as the
        model was trained) or "sequential" (what diffusers' edit pipelines get from transformers 5.x, see
        ``text_host.POSITION_MODES``). Older artifacts use transformers.
        """
        manifest = Manifest.load(art_dir)
        FlowMatchEulerConfig.from_dict(manifest.model.scheduler)  # fails before any session loads
        if backend == "auto":
            backend = _auto_backend(manifest)
        backends = backend_factory(backend).create(manifest.model, Path(art_dir), manifest=manifest,
                                                   precision=precision, **backend_options)
        config = manifest.model  # Manifest.load resolved text_encoder_dir against the artifact folder
        if pipeline_class is not None:
            config = dataclasses.replace(config, pipeline_class=resolve_pipeline_class(Path(art_dir), {}, pipeline_class))
        if text_encoder_dtype is not None:
            config = dataclasses.replace(config, text_encoder_dtype=text_encoder_dtype)
        text = None
        if load_text_encoder:
            text = _compiled_text_encoder(Path(art_dir), manifest, backend, config, condition_image_area,
                                          text_positions)
            if text is None:
                text = _text_encoder(config, condition_image_area)
        try:
            _ = config.latent_channels, config.text_hidden_size  # read at every call: fail here instead
            return cls(config, backends, text, budgets=manifest.budgets or None)
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"The manifest's model config is unusable ({type(err).__name__}: {err}).",
                                "the manifest is damaged; re-run the export.") from err

    # ---- the call -----------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | None = None,
        image: Sequence | str | os.PathLike | Image.Image | np.ndarray | None = None,
        negative_prompt: str | None = None,
        true_cfg_scale: float = 4.0,
        num_inference_steps: int = 50,
        budget: Budget | int = 1024 * 1024,
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

        Zero references is plain text-to-image generation and needs ``width`` and ``height``. ``image`` is a list
        of references (paths, PIL images, HWC arrays) or a single one. ``budget`` is a :class:`Budget` or an int
        (a pixel count; 1024, 1536 and 2048 are read as sides). Every argument is checked before any model runs; a
        bad one raises ``InputError``.
        """
        t_start = time.perf_counter()
        times = StageTimes()
        # 1. check inputs, read the references
        self.check_inputs(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, num_inference_steps,
                          policy, output_type, budget, true_cfg_scale=true_cfg_scale, seed=seed, width=width,
                          height=height, latents=latents, prompt_embeds_mask=prompt_embeds_mask,
                          negative_prompt_embeds_mask=negative_prompt_embeds_mask, callback=callback)
        images = load_images(image)
        self._check_references(len(images))
        do_cfg = true_cfg_scale > 1.0 and (negative_prompt is not None or negative_prompt_embeds is not None)
        digests = [image_digest(im) for im in images]  # one content key per reference, shared by both caches

        # 2. pack the references into the budget
        t0 = time.perf_counter()
        layout = pack_references([im.size for im in images], as_budget(budget), policy, width, height)
        self.last_layout = layout
        times.pack_rope += time.perf_counter() - t0
        z = self.config.latent_channels
        latents = None if latents is None else np.asarray(latents, dtype=np.float32)
        if latents is not None and latents.shape != (1, layout.num_target_tokens, 4 * z):
            raise InputError(f"latents have shape {latents.shape}, expected (1, {layout.num_target_tokens}, {4 * z}) "
                             "for this layout.")

        # 3. text conditioning
        t0 = time.perf_counter()
        sizes = [(slot.width, slot.height) for slot in layout.references]
        check = getattr(self.text_encoder, "check", None)  # the compiled encoder checks every prompt up front
        for text in (prompt, negative_prompt if do_cfg else None):
            if check is not None and text is not None:
                check(text, images, sizes, image_keys=digests)
        cond = self._embeds(prompt, images, sizes, prompt_embeds, prompt_embeds_mask, digests)
        uncond = (self._embeds(negative_prompt, images, sizes, negative_prompt_embeds, negative_prompt_embeds_mask,
                               digests) if do_cfg else None)
        times.text_encode = time.perf_counter() - t0

        # 4. VAE-encode the references (cached by content) into packed tokens
        t0 = time.perf_counter()
        ref_tokens = [self._encode_reference(im, slot.width, slot.height, key)
                      for im, slot, key in zip(images, layout.references, digests, strict=True)]
        times.vae_encode = time.perf_counter() - t0

        # 5. initial latents
        tgt = layout.target
        n_target = layout.num_target_tokens
        if latents is None:
            latents = lat.initial_noise(seed, z, tgt.latent_h, tgt.latent_w)
        latents = np.asarray(latents, dtype=np.float32)

        # 6. RoPE tables and the static DiT feeds
        t0 = time.perf_counter()
        prompts = [cond] if uncond is None else [cond, uncond]
        static = [self.static_feeds(layout, e, m) for e, m in prompts]
        times.pack_rope += time.perf_counter() - t0

        # 7. timesteps (dynamic shift from the TARGET token count)
        scheduler = FlowMatchEulerScheduler(self.scheduler_config)
        scheduler.set_timesteps(num_inference_steps, image_seq_len=n_target)

        # 8. denoise
        result = denoise(self.backends[DIT], static, latents, ref_tokens, scheduler, true_cfg_scale,
                         callback=callback)
        latents, times.dit, times.scheduler = result.latents, result.dit_seconds, result.scheduler_seconds

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
                     output_type, budget, *, true_cfg_scale: float = 4.0, seed: int | None = None,
                     width: int | None = None, height: int | None = None, latents=None, prompt_embeds_mask=None,
                     negative_prompt_embeds_mask=None, callback=None) -> None:
        """Reject inconsistent or unsupported arguments with a one-line ``InputError``, before any model runs.

        Shapes that depend on the packed layout (``latents``) are checked right after packing, still before any
        model runs.
        """
        if (prompt is None) == (prompt_embeds is None):
            raise InputError("Pass exactly one of prompt and prompt_embeds.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise InputError("Pass at most one of negative_prompt and negative_prompt_embeds.")
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if text is not None and not isinstance(text, str):
                raise InputError(f"{name} must be a string, got {type(text).__name__}.", "run one prompt per call.")
        if not _is_int(steps) or steps < 1:
            raise InputError(f"num_inference_steps must be a positive integer, got {steps!r}.")
        if not isinstance(policy, str) or policy not in POLICIES:
            raise InputError(f"Unknown packing policy {policy!r}.", f"use one of {', '.join(POLICIES)}.")
        if not isinstance(output_type, str) or output_type not in ("pil", "np", "latent"):
            raise InputError(f"Unknown output_type {output_type!r}.", "use 'pil', 'np' or 'latent'.")
        if isinstance(true_cfg_scale, bool) or not isinstance(true_cfg_scale, numbers.Real) \
                or not math.isfinite(true_cfg_scale):
            raise InputError(f"true_cfg_scale must be a finite number, got {true_cfg_scale!r}.", "e.g. 4.0.")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
            raise InputError(f"seed must be None or an integer in [0, 2**63), got {seed!r}.")
        for name, side in (("width", width), ("height", height)):
            if side is not None and (not _is_int(side) or side < 1):
                raise InputError(f"{name} must be None or a positive integer, got {side!r}.")
        if callback is not None and not callable(callback):
            raise InputError(f"callback must be callable, got {type(callback).__name__}.")
        if latents is not None:
            _finite_array("latents", latents, ndim=3)
        for name, embeds, mask in (("prompt_embeds", prompt_embeds, prompt_embeds_mask),
                                   ("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_embeds_mask)):
            if embeds is None and mask is not None:
                raise InputError(f"{name}_mask was given without {name}.")
            if embeds is not None:
                self._check_embeds(name, embeds, mask)
        self.check_budget(as_budget(budget))

    def check_budget(self, budget: Budget) -> None:
        """Any budget up to the largest compiled one (the largest trained one without artifacts); exactly a
        compiled bucket when a backend needs one."""
        largest = trained_budgets()[-1]
        if budget > largest:
            raise InputError(f"Budget {budget} is beyond the largest trained budget ({largest}).",
                             f"use a budget up to {largest.name}.")
        if self.budgets is None:
            return
        have = ", ".join(b.name for b in self.budgets)
        if self.exact_buckets and budget not in self.budgets:
            raise InputError(
                f"Budget {budget.name} has no compiled TensorRT bucket in these artifacts (compiled: {have}).",
                f"use one of {have}, build engines for it, or run with the ort backend.",
            )
        if budget > self.budgets[-1]:
            raise InputError(
                f"Budget {budget.name} exceeds the largest budget compiled into these artifacts ({have}).",
                f"use a budget up to {self.budgets[-1].name}, or re-run the export with --budgets including it.",
            )

    def _check_embeds(self, name: str, embeds, mask) -> None:
        arr = _finite_array(name, embeds)
        d = self.config.text_hidden_size
        shape = arr.shape if arr.ndim != 2 else (1, *arr.shape)
        if len(shape) != 3 or shape[0] != 1 or shape[2] != d or shape[1] < 1:
            raise InputError(f"{name} have shape {arr.shape}, expected (1, L, {d}) or (L, {d}).")
        limit = self.pipeline_class.max_text_tokens
        if shape[1] > limit:
            raise InputError(f"{name} have {shape[1]} tokens, over the limit of {limit}.",
                             "shorten the prompt.")
        if mask is not None:
            m = _array(f"{name}_mask", mask)
            if m.size != shape[1] or m.shape not in (shape[:2], shape[1:2]):
                raise InputError(f"{name}_mask has shape {m.shape}, expected {shape[:2]}.")
            if m.dtype.kind not in "biu" or not m.any():
                raise InputError(f"{name}_mask must be boolean (or 0/1) with at least one True.")

    def _check_references(self, count: int) -> None:
        """Refuse a reference count the pipeline class does not take (Qwen-Image-Edit: exactly one)."""
        cls = self.pipeline_class
        if count < cls.min_references or (cls.max_references is not None and count > cls.max_references):
            want = (f"exactly {cls.min_references}" if cls.min_references == cls.max_references
                    else f"at least {cls.min_references}")
            raise InputError(f"{cls.name} takes {want} reference image(s), got {count}.",
                             f"pass {want} --image, or use a {EDIT_PLUS} model for several references.")

    def _embeds(self, prompt, images, sizes, embeds, mask, digests=None) -> tuple[np.ndarray, np.ndarray]:
        if embeds is None:
            if self.text_encoder is None:
                raise InputError(
                    "No text encoder is available for this model.",
                    "pass prompt_embeds (and negative_prompt_embeds), or use a model folder with text_encoder/.",
                )
            return trim_text_padding(*self.text_encoder.encode(prompt, images, sizes, image_keys=digests))
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

    def _encode_reference(self, img: Image.Image, width: int, height: int, digest: str | None = None) -> np.ndarray:
        key = f"{digest or image_digest(img)}->{width}x{height}"
        if key in self._vae_cache:
            self._vae_cache.move_to_end(key)
            return self._vae_cache[key]
        latent = self._vae(VAE_ENCODER, to_model_input(img, width, height))
        tokens = lat.pack(lat.normalize(latent, self.latents_mean, self.latents_std))
        self._vae_cache[key] = tokens
        if len(self._vae_cache) > self.vae_cache_size:
            self._vae_cache.popitem(last=False)
        return tokens

    def static_feeds(self, layout: PackedLayout, embeds: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The DiT feeds fixed over the loop for ``layout`` and one prompt (see ``graphs.dit_static_feeds``)."""
        return dit_static_feeds(self.config, self.rope, layout, embeds, mask)

    def close(self) -> None:
        for b in self.backends.values():
            b.deactivate()


def _is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _array(name: str, value) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise InputError(f"{name} is not an array ({err}).") from None
    if arr.dtype == object:
        raise InputError(f"{name} is not a numeric array.")
    return arr


def _finite_array(name: str, value, ndim: int | None = None) -> np.ndarray:
    arr = _array(name, value)
    if arr.dtype.kind not in "fiu" or (ndim is not None and arr.ndim != ndim):
        raise InputError(f"{name} must be a float array" + (f" of rank {ndim}" if ndim else "")
                         + f", got dtype {arr.dtype} shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} holds NaN or infinite values.")
    return arr


def _text_encoder(config: ModelConfig, condition_area: int) -> QwenPromptEncoder | None:
    if config.text_encoder_dir and Path(config.text_encoder_dir, "text_encoder").is_dir():
        return QwenPromptEncoder(config.text_encoder_dir, condition_area=condition_area,
                                 dtype=config.text_encoder_dtype, pipeline=pipeline_class_info(config.pipeline_class))
    return None


def _compiled_text_encoder(art_dir: Path, manifest: Manifest, backend: str, config: ModelConfig,
                           condition_area: int, positions: str):
    """The exported prompt encoder when the artifacts hold one (``manifest.text``), else None."""
    from .text_onnx import CompiledPromptEncoder, text_record
    from .text_runners import text_graph_runners, text_runtime

    if text_record(art_dir, manifest) is None or text_runtime(backend) is None:
        return None  # older artifacts, or no runtime for the text graphs: transformers encodes

    return CompiledPromptEncoder.from_artifacts(art_dir, manifest, text_graph_runners(art_dir, manifest, backend),
                                                condition_area=condition_area,
                                                pipeline=pipeline_class_info(config.pipeline_class),
                                                positions=positions)


def _auto_backend(manifest: Manifest) -> str:
    """The fastest installed backend for this machine (the measured rule in ``backends/auto.py``)."""
    from .backends.auto import choose_backend

    return choose_backend(manifest)
