"""Text conditioning: Qwen2.5-VL prompt embeddings, as Qwen-Image-Edit-Plus computes them.

The prompt is wrapped in the edit template with one "Picture i" vision block per reference; the condition images
(each resized to ``condition_area`` pixels, aspect kept) go through the processor with the text; the last hidden
state of the model, minus the template's first ``DROP_TOKENS`` tokens, is the conditioning. transformers and
torch are imported only when a ``QwenPromptEncoder`` is first used.
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
from .packing import calculate_dimensions

EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PICTURE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
DROP_TOKENS = 64  # the template's system part, removed from the conditioning
CONDITION_IMAGE_AREA = 384 * 384
MAX_TEXT_TOKENS = 1024  # the DiT's text-axis maximum (engine profiles go up to here)


def condition_images(images: Sequence[Image.Image], area: int = CONDITION_IMAGE_AREA) -> list[Image.Image]:
    """Resize each reference to ``area`` pixels (sides multiples of 32, aspect kept) for the vision tower."""
    out = []
    for img in images:
        w, h = calculate_dimensions(area, img.width / img.height)
        out.append(resize(img, w, h))
    return out


def format_prompt(prompt: str, num_images: int) -> str:
    """The full templated text for ``prompt`` with ``num_images`` picture blocks."""
    pictures = "".join(PICTURE_TEMPLATE.format(i + 1) for i in range(num_images))
    return EDIT_TEMPLATE.format(pictures + prompt)


class QwenPromptEncoder:
    """Qwen2.5-VL prompt encoder loaded from a diffusers-format model folder (text_encoder/, processor/).

    Args:
        model_dir: the model folder.
        condition_area: pixel area of the condition images (diffusers' CONDITION_IMAGE_AREA).
        dtype: torch dtype name for the text model.
        cache_size: number of (prompt, images) embeddings kept in memory.
    """

    def __init__(self, model_dir: str | Path, condition_area: int = CONDITION_IMAGE_AREA, dtype: str = "float32",
                 cache_size: int = 16):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "text_encoder").is_dir():
            raise InputError(
                f"No text encoder under '{self.model_dir}'.",
                "pass prompt_embeds, or point the manifest/model folder at a checkpoint with text_encoder/.",
            )
        self.condition_area, self.dtype = condition_area, dtype
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
                    self.model_dir / "text_encoder", torch_dtype=getattr(torch, self.dtype)
                ).eval()
        except (OSError, ValueError) as err:
            raise MissingDependencyError(f"Cannot load the text encoder from '{self.model_dir}': {err}.") from err

    def encode(self, prompt: str, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [1, L, D] float32 and mask [1, L] bool for ``prompt`` with the references ``images``."""
        key = _cache_key(prompt, images, self.condition_area)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if self._processor is None:
            self._load("processor")
        torch = require("torch", extra="torch")
        cond = condition_images(images, self.condition_area)
        inputs = self._processor(
            text=[format_prompt(prompt, len(cond))], images=cond or None, padding=True, return_tensors="pt"
        )
        keep = inputs["attention_mask"][0].bool()
        # Length check before the (slow) text model runs: the conditioning is every attended token but the first
        # DROP_TOKENS, image placeholder tokens included.
        num_tokens = int(keep.sum()) - DROP_TOKENS
        if num_tokens <= 0:
            raise InputError("The prompt encodes to zero tokens after the template.", "pass a non-empty prompt.")
        if num_tokens > MAX_TEXT_TOKENS:
            raise InputError(
                f"The prompt encodes to {num_tokens} text tokens, over the limit of {MAX_TEXT_TOKENS}.",
                "shorten the prompt.",
            )
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
        hidden = out.hidden_states[-1][0][keep][DROP_TOKENS:]
        embeds = hidden.float().cpu().numpy()[None]
        result = (embeds, np.ones(embeds.shape[:2], dtype=bool))
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result


def _cache_key(prompt: str, images: Sequence[Image.Image], area: int) -> str:
    h = hashlib.sha256(prompt.encode())
    h.update(str(area).encode())
    for img in images:
        h.update(f"{img.size}{img.mode}".encode())
        h.update(img.tobytes())
    return h.hexdigest()
