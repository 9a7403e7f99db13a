"""The I/O contract of the two prompt-encoder graphs (``text_vision``, ``text_encoder``) and their size limits.

Shared by the exporter, the engine planner and the runtime; numpy-free and torch-free. The graphs follow
``TEXT_CONTRACT.md``: every table the model derives from positions (vision rotary tables, window order, M-RoPE
tables, attention masks) is computed on the host and fed as an input, so the graphs are plain tensor programs.

Limits (one place, documented here):

- ``max_text_len`` = the template's dropped system part (``drop_tokens``) + the pipeline class's conditioning
  limit (``max_text_tokens``: 1024 for Edit-Plus, whose conditioning holds the picture blocks and their image
  tokens too; 8192 for Edit). The runtime refuses a longer conditioning before any model runs, so no longer
  sequence ever reaches the graph.
- ``vision_max_patches(budget)`` = 4 x the merged tokens the longest accepted sequence can hold, and no more than
  the patches of the most references the budget takes, each at its largest processed size:
  Edit-Plus: ``min(max_references(budget) x P(condition_area), 4 x max_text_tokens)``, P(a) the most patches one
  condition image of area ``a`` (sides rounded to 32 as diffusers does, then to 28 by the Qwen2-VL processor,
  within its min/max pixels) can have over all aspects; Edit: one reference of up to ``budget`` pixels, also
  capped by ``4 x max_text_tokens``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .budget import Budget
from .manifest import TensorSpec
from .packing import MAX_ASPECT, calculate_dimensions, max_references
from .pipeline_classes import PipelineClass

TEXT_VISION, TEXT_ENCODER = "text_vision", "text_encoder"
TEXT_GRAPHS = (TEXT_VISION, TEXT_ENCODER)
PATCHES, MERGED, TEXT_LEN = "patches", "merged", "text_len"
TEXT_DIR = "text"  # ART/text/: tokenizer, processor configs, config.json, the token-embedding table
EMBED_TABLE = "embed_tokens.npy"
EMBED_TABLE_FP16 = "embed_tokens.fp16.npy"
PROCESSOR_MAX_ASPECT = 200  # the Qwen2-VL processor refuses images with a longer aspect ratio
MASK_MIN = -65504.0  # the additive masks' "blocked" value: finite in fp16 too
#: inputs kept float32 at every graph precision (rotary tables and masks), by position
VISION_FLOAT32_INPUTS = (2, 3, 4, 5)
ENCODER_FLOAT32_INPUTS = (1, 2, 3)


@dataclass(frozen=True)
class EncoderDims:
    """The sizes the two graphs need, read from a Qwen2.5-VL ``config.json`` (transformers 4.x or 5.x layout)."""

    hidden: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    vision_hidden: int
    vision_heads: int
    vision_depth: int
    out_hidden: int
    patch_dim: int
    spatial_merge_size: int
    patch_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden // self.vision_heads

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @classmethod
    def from_config(cls, cfg: dict) -> EncoderDims:
        text = cfg.get("text_config") or cfg
        vision = cfg["vision_config"]
        hidden = int(text.get("hidden_size") or cfg["hidden_size"])
        return cls(
            hidden=hidden, heads=int(text["num_attention_heads"]), kv_heads=int(text["num_key_value_heads"]),
            layers=int(text["num_hidden_layers"]), vocab=int(text["vocab_size"]),
            vision_hidden=int(vision["hidden_size"]), vision_heads=int(vision["num_heads"]),
            vision_depth=int(vision["depth"]), out_hidden=int(vision.get("out_hidden_size", hidden)),
            patch_dim=int(vision.get("in_channels", 3)) * int(vision["temporal_patch_size"]) * int(vision["patch_size"]) ** 2,
            spatial_merge_size=int(vision["spatial_merge_size"]), patch_size=int(vision["patch_size"]))


def text_vision_io(dims: EncoderDims) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """pixel_patches [N, C*T*p*p], window_index [M], vision_cos/sin [N, hd], window/full mask [1, 1, N, N]
    -> image_embeds [M, out_hidden] (N = patches, M = merged = N / merge_unit)."""
    return (
        (TensorSpec("pixel_patches", "float32", (PATCHES, dims.patch_dim)),
         TensorSpec("window_index", "int64", (MERGED,)),
         TensorSpec("vision_cos", "float32", (PATCHES, dims.vision_head_dim)),
         TensorSpec("vision_sin", "float32", (PATCHES, dims.vision_head_dim)),
         TensorSpec("window_mask", "float32", (1, 1, PATCHES, PATCHES)),
         TensorSpec("full_mask", "float32", (1, 1, PATCHES, PATCHES))),
        (TensorSpec("image_embeds", "float32", (MERGED, dims.out_hidden)),),
    )


def text_encoder_io(dims: EncoderDims) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """inputs_embeds [1, L, D], rope_cos/sin [1, L, head_dim], attention_mask [1, 1, L, L]
    -> last_hidden_state [1, L, D] (L = text_len)."""
    return (
        (TensorSpec("inputs_embeds", "float32", (1, TEXT_LEN, dims.hidden)),
         TensorSpec("rope_cos", "float32", (1, TEXT_LEN, dims.head_dim)),
         TensorSpec("rope_sin", "float32", (1, TEXT_LEN, dims.head_dim)),
         TensorSpec("attention_mask", "float32", (1, 1, TEXT_LEN, TEXT_LEN))),
        (TensorSpec("last_hidden_state", "float32", (1, TEXT_LEN, dims.hidden)),),
    )


def text_graph_io(name: str, cfg: dict) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of text graph ``name`` for the text encoder ``config.json`` dict ``cfg``."""
    dims = EncoderDims.from_config(cfg)
    return text_vision_io(dims) if name == TEXT_VISION else text_encoder_io(dims)


# --- limits ------------------------------------------------------------------------------------------------------


def max_text_len(pipeline: PipelineClass) -> int:
    """Longest sequence the text encoder sees: the dropped template part + the conditioning limit."""
    return pipeline.drop_tokens + pipeline.max_text_tokens


def processed_patches(width: int, height: int, processor: dict) -> int:
    """Patches of one image after the Qwen2-VL processor's smart resize (sides to multiples of patch x merge,
    area within min/max pixels), one temporal frame."""
    patch = int(processor.get("patch_size", 14))
    factor = patch * int(processor.get("merge_size", 2))
    lo, hi = int(processor.get("min_pixels", 56 * 56)), int(processor.get("max_pixels", 28 * 28 * 1280))
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > hi:
        beta = math.sqrt(height * width / hi)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < lo:
        beta = math.sqrt(lo / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // patch) * (w // patch)


def most_patches_at_area(area: int, processor: dict, steps: int = 4000) -> int:
    """The most patches one image resized to ``area`` pixels can have, over the aspects both the packing and the
    processor accept (up to ``min(MAX_ASPECT, PROCESSOR_MAX_ASPECT)``)."""
    best, widest = 0, min(MAX_ASPECT, PROCESSOR_MAX_ASPECT)
    for i in range(steps + 1):  # log-spaced aspects; the 32-rounded sizes change far more slowly than this grid
        ratio = widest ** (2 * i / steps - 1)
        w, h = calculate_dimensions(area, ratio)
        best = max(best, processed_patches(max(w, 32), max(h, 32), processor))
    return best


def vision_max_patches(pipeline: PipelineClass, budget: Budget | int, processor: dict) -> int:
    """Most patches one prompt can send to ``text_vision`` at ``budget`` (see the module docstring)."""
    budget = Budget.coerce(budget)
    cap = 4 * pipeline.max_text_tokens
    if pipeline.condition_area is not None:
        refs = max_references(budget) if pipeline.max_references is None else pipeline.max_references
        return min(refs * most_patches_at_area(pipeline.condition_area, processor), cap)
    return min(most_patches_at_area(budget.pixels, processor), cap)
