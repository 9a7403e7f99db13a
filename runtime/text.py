"""Text conditioning: Qwen2.5-VL prompt embeddings, as diffusers' Qwen-Image edit pipelines compute them.

The prompt is wrapped in the model's edit template (``runtime/pipeline_classes.py``: Edit-Plus labels one
"Picture i" vision block per reference, Edit has one unlabelled block); the condition images (Edit-Plus: each
reference resized to ``condition_area`` pixels, aspect kept; Edit: the reference at its VAE size) go through the
processor with the text; the last hidden state of the model, minus the template's first ``drop_tokens`` tokens,
is the conditioning. transformers and torch are imported only when a ``QwenPromptEncoder`` is first used.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ._lazy import require
from .errors import InputError, MissingDependencyError
from .images import resize
from .manifest import TEXT_ENCODER_DTYPES
from .packing import calculate_dimensions
from .pipeline_classes import (
    CONDITION_IMAGE_AREA,
    EDIT_PLUS,
    MAX_TEXT_TOKENS,
    PIPELINE_CLASSES,
    PipelineClass,
)

__all__ = ["CONDITION_IMAGE_AREA", "MAX_TEXT_TOKENS", "QwenPromptEncoder", "condition_images", "resolve_text_dtype"]


def condition_images(images: Sequence[Image.Image], area: int = CONDITION_IMAGE_AREA) -> list[Image.Image]:
    """Resize each reference to ``area`` pixels (sides multiples of 32, aspect kept) for the vision tower.

    A side never rounds below 32 (it could only for aspects beyond ``packing.MAX_ASPECT`` or tiny areas).
    """
    out = []
    for img in images:
        w, h = calculate_dimensions(area, img.width / img.height)
        out.append(resize(img, max(w, 32), max(h, 32)))
    return out


def resolve_text_dtype(dtype: str) -> str:
    """``"auto"`` -> bfloat16 where the GPU or CPU computes it natively, else float32; other names unchanged.

    Raises:
        InputError: ``dtype`` is not one of ``TEXT_ENCODER_DTYPES``.
    """
    if dtype not in TEXT_ENCODER_DTYPES:
        raise InputError(f"Unknown text-encoder dtype '{dtype}'.", f"use one of {', '.join(TEXT_ENCODER_DTYPES)}.")
    if dtype != "auto":
        return dtype
    return "bfloat16" if _bf16_native() else "float32"


def _bf16_native() -> bool:
    """True when CUDA reports bf16 support, or the CPU has AVX512-BF16 / AMX-BF16 (Linux ``/proc/cpuinfo``)."""
    torch = require("torch", extra="torch")
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class QwenPromptEncoder:
    """Qwen2.5-VL prompt encoder loaded from a diffusers-format model folder (text_encoder/, processor/).

    Args:
        model_dir: the model folder.
        condition_area: pixel area of the Edit-Plus condition images (diffusers' CONDITION_IMAGE_SIZE, 384²).
        dtype: torch dtype name for the text model ("float32", "bfloat16", or "auto": see ``resolve_text_dtype``).
        cache_size: number of (prompt, images) embeddings kept in memory.
        pipeline: the model's ``PipelineClass`` (template, dropped tokens, condition images); Edit-Plus by default.
    """

    def __init__(self, model_dir: str | Path, condition_area: int = CONDITION_IMAGE_AREA, dtype: str = "float32",
                 cache_size: int = 16, pipeline: PipelineClass = PIPELINE_CLASSES[EDIT_PLUS]):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "text_encoder").is_dir():
            raise InputError(
                f"No text encoder under '{self.model_dir}'.",
                "pass prompt_embeds, or point the manifest/model folder at a checkpoint with text_encoder/.",
            )
        self.condition_area, self.dtype, self.pipeline = condition_area, resolve_text_dtype(dtype), pipeline
        self._model: Any = None  # Qwen2.5-VL and its processor, loaded on first use
        self._processor: Any = None
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size

    def _load(self, part: str) -> None:
        """Load the processor (``part="processor"``) or the text model (``part="model"``)."""
        torch = require("torch", extra="torch")
        try:
            transformers = require("transformers", extra="torch")
            if part == "processor":
                self._processor = transformers.AutoProcessor.from_pretrained(self.model_dir / "processor")
            else:
                self._model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
                    self.model_dir / "text_encoder", dtype=getattr(torch, self.dtype)
                ).eval()
        except (OSError, ValueError) as err:
            raise MissingDependencyError(f"Cannot load the text encoder from '{self.model_dir}': {err}.") from err

    def condition(self, images: Sequence[Image.Image],
                  vae_sizes: Sequence[tuple[int, int]] | None = None) -> list[Image.Image]:
        """The vision tower's images: at ``condition_area`` (Edit-Plus) or each reference's VAE (w, h) (Edit)."""
        if self.pipeline.condition_area is not None:
            return condition_images(images, self.condition_area)
        if len(images) != 1:
            raise InputError(f"{self.pipeline.name} conditions on exactly one reference image, got {len(images)}.")
        if vae_sizes is None or len(vae_sizes) != len(images):
            raise InputError(f"{self.pipeline.name} conditions on each reference at its VAE size; none was given.",
                             "pass vae_sizes (the packed reference sizes).")
        return [resize(img, w, h) for img, (w, h) in zip(images, vae_sizes, strict=True)]

    def encode(self, prompt: str, images: Sequence[Image.Image],
               vae_sizes: Sequence[tuple[int, int]] | None = None,
               image_keys: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [1, L, D] float32 and mask [1, L] bool for ``prompt`` with the references ``images``.

        ``vae_sizes`` (each reference's packed (w, h)) is needed by pipelines that condition on the VAE-sized image;
        ``image_keys`` (per-reference content digests) is accepted for the compiled encoder's interface.
        """
        cond = self.condition(images, vae_sizes)
        key = _cache_key(prompt, cond, self.condition_area)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if self._processor is None:
            self._load("processor")
        torch = require("torch", extra="torch")
        inputs = self._processor(
            text=[self.pipeline.format_prompt(prompt, len(cond))], images=cond or None, padding=True,
            return_tensors="pt",
        )
        keep = inputs["attention_mask"][0].bool()
        self._check_length(int(keep.sum()) - self.pipeline.drop_tokens, inputs["input_ids"][0])
        if self._model is None:
            self._load("model")
        with torch.inference_mode():
            out = self._model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs.get("pixel_values"),
                image_grid_thw=inputs.get("image_grid_thw"),
                output_hidden_states=True,
            )
        hidden = out.hidden_states[-1][0][keep][self.pipeline.drop_tokens:]
        embeds = hidden.float().cpu().numpy()[None]
        result = (embeds, np.ones(embeds.shape[:2], dtype=bool))
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result

    def _check_length(self, num_tokens: int, input_ids) -> None:
        """Refuse an empty or too long conditioning before the (slow) text model runs.

        The conditioning is every attended token but the dropped ones, image placeholders included; a pipeline
        conditioning on VAE-sized images counts its prompt limit without the image's tokens.
        """
        if num_tokens <= 0:
            raise InputError("The prompt encodes to zero tokens after the template.", "pass a non-empty prompt.")
        prompt_tokens = num_tokens
        if self.pipeline.condition_area is None:
            image_pad = self._processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            prompt_tokens -= int((input_ids == image_pad).sum())
        for got, limit in ((prompt_tokens, MAX_TEXT_TOKENS), (num_tokens, self.pipeline.max_text_tokens)):
            if got > limit:
                raise InputError(f"The prompt encodes to {got} text tokens, over the limit of {limit}.",
                                 "shorten the prompt.")


def _cache_key(prompt: str, images: Sequence[Image.Image], area: int) -> str:
    h = hashlib.sha256(prompt.encode())
    h.update(str(area).encode())
    for img in images:
        h.update(f"{img.size}{img.mode}".encode())
        h.update(img.tobytes())
    return h.hexdigest()
