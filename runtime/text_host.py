"""Host side of the compiled prompt encoder: template + tokens, vision patches and positions, without torch.

``TextHost.prepare`` turns (prompt, condition images) into everything the ``text_vision`` and ``text_encoder``
graphs take, exactly as transformers' ``Qwen2VLProcessor`` and ``Qwen2_5_VLModel`` would compute it. The
tokenizer is a ``tokenizers`` JSON (``tokenizers`` is imported on first use: the ``[ort]`` extra has it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ._lazy import require
from .errors import InputError, ManifestError
from .pipeline_classes import MAX_TEXT_TOKENS, PipelineClass
from .text_image_processor import ImageProcessorConfig, preprocess_images
from .text_positions import QwenVLConfig, rope_index, sequential_positions, vision_inputs

__all__ = ["IMAGE_TOKEN", "POSITION_MODES", "HostInputs", "PromptTokenizer", "TextHost"]

IMAGE_TOKEN = "<|image_pad|>"
# "mrope": 3-D positions per image (how Qwen2.5-VL was trained; transformers computes them when given the
# processor's mm_token_type_ids). "sequential": 0..L-1 on every axis, what transformers 5.x falls back to when
# the caller drops mm_token_type_ids, as diffusers' Qwen-Image edit pipelines do (diffusers issue #14194).
POSITION_MODES = ("mrope", "sequential")


class PromptTokenizer:
    """Qwen2's byte-level BPE from a ``tokenizer.json``, with the processor's image-token expansion."""

    def __init__(self, path: str | Path):
        tokenizers = require("tokenizers", extra="ort")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises plain Exception subclasses for bad JSON
            raise ManifestError(f"Cannot read the tokenizer '{path}' ({err}).", "re-export the artifacts.") from err
        image_id = self._tok.token_to_id(IMAGE_TOKEN)
        if image_id is None:
            raise ManifestError(f"The tokenizer '{path}' has no {IMAGE_TOKEN} token.", "re-export the artifacts.")
        self.image_token_id = int(image_id)

    def encode(self, text: str) -> np.ndarray:
        """Token ids [L] int64 of ``text`` (special tokens written in the text are kept as such)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=True).ids, dtype=np.int64)

    @staticmethod
    def expand_images(text: str, tokens_per_image: Sequence[int]) -> str:
        """Repeat the i-th image placeholder ``tokens_per_image[i]`` times, as ``Qwen2VLProcessor`` does.

        Raises:
            InputError: the text holds a different number of placeholders than there are images.
        """
        parts = text.split(IMAGE_TOKEN)
        if len(parts) - 1 != len(tokens_per_image):
            raise InputError(f"The prompt holds {len(parts) - 1 - len(tokens_per_image)} extra {IMAGE_TOKEN} "
                             "marker(s).", f"remove {IMAGE_TOKEN} from the prompt text.")
        out = parts[0]
        for count, rest in zip(tokens_per_image, parts[1:], strict=True):
            out += IMAGE_TOKEN * count + rest
        return out


@dataclass(frozen=True)
class HostInputs:
    """One prompt's host-side tensors (the graphs' feeds but the embeddings)."""

    input_ids: np.ndarray  # [L] int64, template included
    pixel_patches: np.ndarray  # [N, C*T*p*p] float32 (N = 0 without references)
    grids: np.ndarray  # [n_images, 3] int64
    positions: np.ndarray  # [3, L] int64
    vision: dict[str, np.ndarray]  # window_index, vision_cos/sin, window_mask, full_mask (empty without images)


class TextHost:
    """Tokenizer, image processor and Qwen2.5-VL position logic read from one folder's files.

    Args:
        tokenizer: ``tokenizer.json``.
        processor_config: ``preprocessor_config.json`` (or a transformers 5 ``processor_config.json``).
        model_config: the text encoder's ``config.json``.
        positions: "mrope" or "sequential" (see ``POSITION_MODES``).
    """

    def __init__(self, tokenizer: str | Path, processor_config: str | Path, model_config: str | Path,
                 positions: str = "mrope"):
        if positions not in POSITION_MODES:
            raise InputError(f"Unknown position mode {positions!r}.", f"use one of {', '.join(POSITION_MODES)}.")
        self.tokenizer = PromptTokenizer(tokenizer)
        self.processor = ImageProcessorConfig.from_file(processor_config)
        self.config = QwenVLConfig.from_file(model_config)
        self.positions = positions
        if self.tokenizer.image_token_id != self.config.image_token_id:
            raise ManifestError(f"The tokenizer's {IMAGE_TOKEN} id ({self.tokenizer.image_token_id}) is not the "
                                f"model's image_token_id ({self.config.image_token_id}).", "re-export the artifacts.")

    @classmethod
    def from_dir(cls, folder: str | Path, positions: str = "mrope") -> TextHost:
        """An artifact ``text/`` folder, or a diffusers model folder (``processor/`` + ``text_encoder/``)."""
        folder = Path(folder)
        for tok, model in ((folder / "tokenizer.json", folder / "config.json"),
                           (folder / "processor" / "tokenizer.json", folder / "text_encoder" / "config.json")):
            if tok.is_file() and model.is_file():
                base = tok.parent
                pre = base / "preprocessor_config.json"
                return cls(tok, pre if pre.is_file() else base / "processor_config.json", model, positions)
        raise ManifestError(f"No tokenizer.json + config.json under '{folder}'.", "re-export the artifacts.")

    def tokens_per_image(self, grids: np.ndarray) -> list[int]:
        unit = self.processor.merge_size ** 2
        return [int(np.prod(g)) // unit for g in grids]

    def prepare(self, prompt: str, images: Sequence[Image.Image], pipeline: PipelineClass) -> HostInputs:
        """Template, tokenize and preprocess; the conditioning length is checked before anything runs.

        Raises:
            InputError: an image the processor cannot take, a prompt over the token limit or empty after the
                template.
        """
        patches, grids = preprocess_images(images, self.processor)
        text = self.tokenizer.expand_images(pipeline.format_prompt(prompt, len(images)), self.tokens_per_image(grids))
        ids = self.tokenizer.encode(text)
        self.check_length(ids, pipeline)
        positions = (rope_index(ids, grids, self.config) if self.positions == "mrope"
                     else sequential_positions(len(ids)))
        vision = vision_inputs(grids, self.config) if len(grids) else {}
        return HostInputs(ids, patches, grids, positions, vision)

    def check_length(self, ids: np.ndarray, pipeline: PipelineClass) -> None:
        """Refuse an empty or too long conditioning (image tokens count, except for VAE-sized conditioning)."""
        total = len(ids) - pipeline.drop_tokens
        if total <= 0:
            raise InputError("The prompt encodes to zero tokens after the template.", "pass a non-empty prompt.")
        text_tokens = total
        if pipeline.condition_area is None:
            text_tokens -= int((ids == self.config.image_token_id).sum())
        for got, limit in ((text_tokens, MAX_TEXT_TOKENS), (total, pipeline.max_text_tokens)):
            if got > limit:
                raise InputError(f"The prompt encodes to {got} text tokens, over the limit of {limit}.",
                                 "shorten the prompt.")
