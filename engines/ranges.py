"""Optimization-profile ranges of one bucket, derived from the packing rules.

Profiles (bucket ``B``, side ``s``) cover every *profiled request*: policy ``self`` or ``proportional``,
0..``max_references(B)`` references with aspects within ``1:A..A:1`` (``A = max_aspect``, 8), the default target
or an explicit one (both sides with aspect within ``1:A..A:1``, or one side with the other derived), and 1..1024
text tokens. Each range is the tightest box around these requests:

* DiT ``img_tokens``: min 1 (a 16x16 target, no references: the smallest request packing accepts); max
  ``2*B/256`` (target at area ``B`` plus references summing to ``B``); opt = max, because a default edit fills
  the budget (target at ``B``, references sharing ``B``) and lands within a few percent of it.
* DiT ``txt_tokens`` 1..1024, opt 256; ``batch`` 1..2 (batched CFG), opt 1 unless ``cfg_batch``.
* VAE encoder ``height``/``width`` (one reference per call, batch 1): min 32 (a tiny reference next to a large
  one under ``proportional`` is pinned to 32x32); max the long side of a lone ``A:1`` reference (2912 / 4320 /
  5792 px); opt ``s`` (a square reference at the full budget). Both axes share the range (either orientation).
* VAE decoder ``latent_height``/``latent_width``: target sides / 8: min 2 (16 px); max the longest target side
  (2912 / 4336 / 5808 px), reached by an ``A:1`` default target or a given width with the height derived; opt
  ``s/8``.

With a tiled VAE (``PlanOptions.vae_tile``, from the manifest) the VAE sides are capped at the tile: max
``min(max, tile)``, opt ``min(s, tile)``, min 16 px (2 latent cells), the smallest edge tile of a 16-px multiple.

``per-image`` requests (diffusers parity mode) are not covered: each reference takes area ``B`` and rounding may
exceed it, so such a request can overflow the bucket; the TensorRT backend then refuses it with the token
counts. The VAE boxes span both orientations, so their max shape (``A*B`` pixels) costs activation memory;
lower ``max_aspect`` to shrink it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.encoder_io import MERGED, PATCHES, TEXT_ENCODER, TEXT_LEN, TEXT_VISION
from uniref_deploy.runtime.errors import ManifestError, PackingError
from uniref_deploy.runtime.graphs import (
    BATCH,
    DIT,
    HEIGHT,
    IMG_TOKENS,
    LATENT_HEIGHT,
    LATENT_WIDTH,
    TXT_TOKENS,
    VAE_DECODER,
    VAE_ENCODER,
    WIDTH,
)
from uniref_deploy.runtime.manifest import GraphSpec, TensorSpec
from uniref_deploy.runtime.packing import PIXELS_PER_TOKEN_SIDE, pack_references, target_size
from uniref_deploy.runtime.text import MAX_TEXT_TOKENS

from .records import AxisRange, PlanOptions, ProfilePlan, ShapeRange

PROFILED_POLICIES = ("self", "proportional")


def image_token_range(budget: Budget) -> AxisRange:
    """DiT image tokens of ``budget``: the smallest request .. target at ``B`` + references at ``B``."""
    smallest = pack_references([], budget.pixels, width=PIXELS_PER_TOKEN_SIDE, height=PIXELS_PER_TOKEN_SIDE)
    full = pack_references([(budget.side, budget.side)], budget.pixels)  # default square target + one reference
    most = budget.max_image_tokens
    return AxisRange(smallest.num_image_tokens, min(full.num_image_tokens, most), most)


def reference_side_range(budget: Budget, max_aspect: int = 8) -> AxisRange:
    """Pixel sides a reference can get in ``budget`` (aspects within ``1:max_aspect..max_aspect:1``)."""
    # proportional pins a reference far smaller than its neighbours at the 32 px minimum
    tiny = pack_references([(budget.side, budget.side), (1, 1)], budget.pixels, policy="proportional").references[1]
    # the long side grows with the aspect and the area: one reference at the widest aspect takes the whole budget
    longest = max(pack_references([(max_aspect, 1)], budget.pixels, policy=p).references[0].width
                  for p in PROFILED_POLICIES)
    return AxisRange(min(tiny.width, tiny.height), budget.side, longest)


def target_side_range(budget: Budget, max_aspect: int = 8) -> AxisRange:
    """Pixel sides the target (output) can get in ``budget``."""
    px = budget.pixels
    smallest = pack_references([], px, width=PIXELS_PER_TOKEN_SIDE, height=PIXELS_PER_TOKEN_SIDE).target
    default_long = max(target_size([(max_aspect, 1)], px, policy=p)[0] for p in PROFILED_POLICIES)
    return AxisRange(min(smallest.width, smallest.height), budget.side,
                     max(default_long, _longest_given_side(px, max_aspect)))


def _longest_given_side(pixels: int, max_aspect: int) -> int:
    """Longest target side when the user gives sizes: a width with the height derived from an ``A:1`` reference
    (nearest multiple of 16), or both sides at an aspect within ``A:1``. Scanned from above; legality is
    monotone in the long side, so the first legal one is the answer.
    """
    step = PIXELS_PER_TOKEN_SIDE
    top = (math.isqrt(max_aspect * pixels) // step + max_aspect + 1) * step
    for long_side in range(top, step - 1, -step):
        try:
            target_size([(max_aspect, 1)], pixels, width=long_side)
            return long_side
        except PackingError:
            pass
        short = math.ceil(math.ceil(long_side / max_aspect) / step) * step
        if long_side * short <= pixels:
            return long_side
    return step


def _tiled(side: AxisRange, tile: int | None) -> AxisRange:
    """Pixel sides a VAE engine sees when images over ``tile`` are cut into tiles (edge tiles down to 16 px)."""
    if tile is None or side.max <= tile:
        return side
    return AxisRange(min(side.min, PIXELS_PER_TOKEN_SIDE), min(side.opt, tile), tile)


def text_ranges(graph: str, budget: Budget, text: Mapping) -> dict[str, AxisRange]:
    """Prompt-encoder axis ranges of ``budget`` from the manifest's ``text`` record (limits: encoder_io.py).

    ``text_vision``: 1 merged token (the smallest image) .. the most patches a prompt sends in this bucket, opt
    one condition image; ``text_encoder``: 1 .. ``max_text_len`` tokens, opt the dropped template part + 256.
    """
    if graph == TEXT_VISION:
        unit = int(text.get("merge_unit", 4))
        most = int(text.get("vision_patches", {}).get(str(budget.pixels), text["vision_max_patches"]))
        opt = min(int(text.get("vision_opt_patches", most)), most)
        return {PATCHES: AxisRange(unit, opt, most), MERGED: AxisRange(1, opt // unit, most // unit)}
    longest = int(text["max_text_len"])
    return {TEXT_LEN: AxisRange(1, min(int(text.get("opt_text_len", longest)), longest), longest)}


def axis_ranges(graph: str, budget: Budget, options: PlanOptions, vae_scale: int = 8,
                text: Mapping | None = None) -> dict[str, AxisRange]:
    """Named dynamic-axis ranges of ``graph`` in ``budget``.

    Args:
        graph (str): "dit", "vae_encoder" or "vae_decoder".
        budget (Budget): the bucket.
        options (PlanOptions): cfg_batch, max_aspect, opt_text_tokens are used.
        vae_scale (int, default 8): VAE spatial downsample (latent side = pixel side / vae_scale).
        text (Mapping | None): the manifest's ``text`` record, for the prompt-encoder graphs.

    Returns:
        dict[str, AxisRange]: axis name -> range.
    """
    single = AxisRange(1, 1, 1)
    if graph in (TEXT_VISION, TEXT_ENCODER) and text:
        return text_ranges(graph, budget, text)
    if graph == DIT:
        return {
            BATCH: AxisRange(1, 2 if options.cfg_batch else 1, 2),
            IMG_TOKENS: image_token_range(budget),
            TXT_TOKENS: AxisRange(1, options.opt_text_tokens, MAX_TEXT_TOKENS),
        }
    if graph == VAE_ENCODER:
        ref = _tiled(reference_side_range(budget, options.max_aspect), options.vae_tile)
        return {BATCH: single, HEIGHT: ref, WIDTH: ref}
    if graph == VAE_DECODER:
        tgt = _tiled(target_side_range(budget, options.max_aspect), options.vae_tile)
        lat = AxisRange(tgt.min // vae_scale, tgt.opt // vae_scale, tgt.max // vae_scale)
        return {BATCH: single, LATENT_HEIGHT: lat, LATENT_WIDTH: lat}
    raise ManifestError(f"No engine profile rules for graph '{graph}'.", f"plan one of {DIT}, {VAE_ENCODER}, {VAE_DECODER}.")


def input_shapes(inputs: Sequence[TensorSpec], axes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes for axis sizes ``axes`` (static dims kept)."""
    return {s.name: tuple(axes[d] if isinstance(d, str) else d for d in s.shape) for s in inputs}


def make_profile(graph: GraphSpec, budget: Budget, ranges: Mapping[str, AxisRange]) -> ProfilePlan:
    """Turn named axis ranges into per-input shape ranges for the inputs with dynamic axes.

    Raises:
        ManifestError: an input has a dynamic axis without a range.
    """
    shapes = []
    for spec in graph.inputs:
        if not spec.dynamic_axes:
            continue
        unknown = [d for d in spec.dynamic_axes.values() if d not in ranges]
        if unknown:
            raise ManifestError(
                f"Input '{spec.name}' of graph '{graph.key}' has dynamic axis {unknown[0]!r} the engine planner "
                f"has no range for (known: {', '.join(ranges)}).",
                "re-export the graph with this version of uniref-deploy.",
            )
        pick = {k: tuple(getattr(ranges[d], k) if isinstance(d, str) else d for d in spec.shape)
                for k in ("min", "opt", "max")}
        shapes.append((spec.name, ShapeRange(**pick)))
    used = {d for spec in graph.inputs for d in spec.dynamic_axes.values()}
    return ProfilePlan(budget, tuple(shapes), tuple((k, v) for k, v in ranges.items() if k in used))
