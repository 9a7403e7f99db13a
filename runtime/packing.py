"""SELF packing: choose the pixel size of the target and of every reference under one pixel budget.

An image-editing DiT sees one token per 16x16 pixels (VAE downsample 8, then 2x2 patches). The target (output)
comes first in the image-token sequence, then the references in order. A budget ``B`` (pixels) bounds sizes:

* ``self`` (default): every reference gets area ~ ``B/N``, aspect kept, sides multiples of 32, and the sum of
  the reference areas never exceeds ``B`` after rounding.
* ``proportional``: one common scale ``s`` for all references (``area_i = s^2 * w_i * h_i``, sum ``B``),
  sides multiples of 32, same never-exceed-``B`` guarantee.
* ``per-image``: each reference on its own at area ``B``, exactly as diffusers' Qwen-Image-Edit-Plus does
  (the sum may exceed ``B``). Used for parity with diffusers.

Rounding for ``self``/``proportional`` starts from diffusers' rule (nearest multiple of 32 per side); if the
sum then overshoots ``B``, sides that were rounded up are floored one at a time (first the one whose floor
leaves its image's aspect closest to the ideal) until the sum fits. Every side thus ends in
``(ideal - 32, ideal + 16]``, so the aspect error of a reference, and the error of its area against the ideal
area, are below ``log(1 + 32/w) + log(1 + 32/h)`` (output sides ``w``, ``h``).

A reference whose ideal short side is under 32 px (aspect beyond ``area / 32^2``) is *clamped*: short side 32,
long side ``floor32(area / 32)`` so its area does not grow; one whose ideal area is under ``32^2`` becomes
32x32, and ``proportional`` re-spreads the rest of the budget over the other references.

One aspect limit, ``MAX_ASPECT``, is checked here for every reference: below it every later resize keeps a
non-zero side (the 384^2 condition image of the text encoder rounds its short side to 32 up to 576:1; the output
size derived from the last reference keeps 16 px sides at every trained budget).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

from .budget import PIXELS_PER_TOKEN_SIDE, Budget
from .errors import InputError, PackingError

POLICIES = ("self", "proportional", "per-image")
MIN_REFERENCE_SIDE = 256  # a budget holds at most B // MIN_REFERENCE_SIDE**2 references (16 / 36 / 64)
MAX_ASPECT = 512  # long side / short side of a reference; see the module docstring

_VAE_SCALE = 8
_REF_MULTIPLE = 32  # reference sides (diffusers rounds them to 32)
_MIN_REF_AREA = _REF_MULTIPLE * _REF_MULTIPLE


# ---------------------------------------------------------------------------------------------------------
# Layout records
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSlot:
    """One image of the packed sequence.

    Attributes:
        role: ``"target"`` or ``"reference"``.
        index: 0 for the target, 1..N for the references (the RoPE frame index).
        width, height: size in pixels (multiples of 16).
        token_offset: where the image's tokens start in the packed image-token sequence.
    """

    role: str
    index: int
    width: int
    height: int
    token_offset: int

    @property
    def grid_h(self) -> int:
        return self.height // PIXELS_PER_TOKEN_SIDE

    @property
    def grid_w(self) -> int:
        return self.width // PIXELS_PER_TOKEN_SIDE

    @property
    def num_tokens(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def latent_h(self) -> int:
        return self.height // _VAE_SCALE

    @property
    def latent_w(self) -> int:
        return self.width // _VAE_SCALE

    def to_dict(self) -> dict:
        return {
            "role": self.role,
            "index": self.index,
            "width": self.width,
            "height": self.height,
            "token_offset": self.token_offset,
            "grid": [self.grid_h, self.grid_w],
        }


@dataclass(frozen=True)
class PackedLayout:
    """Sizes and token offsets of the target and references of one request.

    Attributes:
        budget: the pixel budget ``B``.
        policy: the policy that produced the reference sizes (one of ``POLICIES``).
        target: the output image slot (index 0, offset 0).
        references: reference slots in input order (index 1..N).
        source_sizes: ``(w, h)`` of the reference images as given.
    """

    budget: Budget
    policy: str
    target: ImageSlot
    references: tuple[ImageSlot, ...]
    source_sizes: tuple[tuple[int, int], ...]

    @property
    def slots(self) -> tuple[ImageSlot, ...]:
        return (self.target, *self.references)

    @property
    def num_target_tokens(self) -> int:
        return self.target.num_tokens

    @property
    def num_reference_tokens(self) -> int:
        return sum(ref.num_tokens for ref in self.references)

    @property
    def num_image_tokens(self) -> int:
        return self.num_target_tokens + self.num_reference_tokens

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """``(grid_h, grid_w)`` per slot, target first."""
        return tuple((slot.grid_h, slot.grid_w) for slot in self.slots)

    @property
    def reference_area(self) -> int:
        return sum(ref.width * ref.height for ref in self.references)

    def key(self) -> tuple:
        """Hashable cache key: the budget and the token grids (all that RoPE tables and shapes depend on)."""
        return (self.budget, self.grids)

    def to_dict(self) -> dict:
        return {
            "budget": self.budget.pixels,
            "policy": self.policy,
            "target": self.target.to_dict(),
            "references": [ref.to_dict() for ref in self.references],
            "source_sizes": [list(size) for size in self.source_sizes],
            "num_image_tokens": self.num_image_tokens,
        }


# ---------------------------------------------------------------------------------------------------------
# Budgets and validation
# ---------------------------------------------------------------------------------------------------------


def as_budget(budget: Budget | int) -> Budget:
    """``budget`` as a :class:`Budget` (a pixel count, or a trained side as shorthand: ``Budget.coerce``).

    Raises:
        PackingError: the budget is not a positive integer.
    """
    try:
        return Budget.coerce(budget)
    except InputError as err:
        raise PackingError(err.message, err.hint) from None


def max_references(budget: Budget | int) -> int:
    """References a budget holds: ``B // MIN_REFERENCE_SIDE**2`` (16 / 36 / 64 for 1024 / 1536 / 2048)."""
    return as_budget(budget).pixels // (MIN_REFERENCE_SIDE * MIN_REFERENCE_SIDE)


def _check_sizes(sizes: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    checked = []
    for i, size in enumerate(sizes, start=1):
        try:
            w, h = (operator.index(v) for v in size)
        except (TypeError, ValueError):
            raise PackingError(
                f"Reference {i} has size {size!r}; expected a (width, height) pair of integers."
            ) from None
        if w <= 0 or h <= 0:
            raise PackingError(
                f"Reference {i} has size {w}x{h}; expected a positive width and height.",
                hint="drop empty images from the request.",
            )
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise PackingError(
                f"Reference {i} ({w}x{h}) has an aspect of {max(w, h) / min(w, h):.0f}:1, beyond the "
                f"{MAX_ASPECT}:1 limit.",
                hint="crop or pad it nearer to square.",
            )
        checked.append((w, h))
    return tuple(checked)


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise PackingError(f"Unknown packing policy {policy!r}; expected one of {', '.join(POLICIES)}.")


def _check_count(count: int, budget: Budget) -> None:
    limit = max_references(budget)
    if count > limit:
        raise PackingError(
            f"{count} references do not fit a {budget} budget: it holds at most {limit} "
            f"(each needs {MIN_REFERENCE_SIDE}x{MIN_REFERENCE_SIDE} px).",
            hint="use fewer references or a larger budget.",
        )


# ---------------------------------------------------------------------------------------------------------
# Rounding
# ---------------------------------------------------------------------------------------------------------


def calculate_dimensions(target_area: float, ratio: float) -> tuple[int, int]:
    """Width and height near ``target_area`` with aspect ``ratio = w/h``, each rounded to a multiple of 32.

    Same arithmetic as diffusers' Qwen-Image ``calculate_dimensions`` (Python ``round``: halves go to even).

    Returns:
        tuple[int, int]: ``(width, height)``; a side may be 0 for extreme ratios.
    """
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / _REF_MULTIPLE) * _REF_MULTIPLE, round(height / _REF_MULTIPLE) * _REF_MULTIPLE


def _floor_to(value: float, multiple: int) -> int:
    return int(value // multiple) * multiple


def _ideal_sides(area: float, ratio: float) -> tuple[float, float]:
    width = math.sqrt(area * ratio)
    return width, width / ratio


def _shrink_to_fit(
    boxes: list[tuple[int, int]], ideals: list[tuple[float, float] | None], limit: int, multiple: int
) -> list[tuple[int, int]]:
    """Floor rounded-up sides until the summed area is at most ``limit``.

    ``ideals[i]`` is the unrounded ``(w, h)`` of box ``i`` or ``None`` for a box that must stay as it is.
    The caller guarantees that the fixed boxes plus the ideal areas fit ``limit``, so this always succeeds
    after at most two floors per box.
    """
    sides = [list(box) for box in boxes]
    total = sum(w * h for w, h in sides)
    while total > limit:
        # Of all rounded-up sides, floor the one that leaves its box's aspect closest to the ideal.
        best: tuple[float, int, int, int] | None = None  # (aspect error, box, axis, new side)
        for i, ideal in enumerate(ideals):
            if ideal is None:
                continue
            for axis in (0, 1):
                if sides[i][axis] > ideal[axis]:
                    trial = list(sides[i])
                    trial[axis] = _floor_to(ideal[axis], multiple)
                    error = abs(math.log(trial[0] / trial[1] * ideal[1] / ideal[0]))
                    if best is None or error < best[0]:
                        best = (error, i, axis, trial[axis])
        if best is None:  # unreachable when the caller's guarantee holds
            raise PackingError(
                f"Could not fit {len(boxes)} images into {limit} px (internal rounding error)."
            )
        _, i, axis, new_side = best
        total -= (sides[i][axis] - new_side) * sides[i][1 - axis]
        sides[i][axis] = new_side
    return [(w, h) for w, h in sides]


def _fit_references(
    areas: list[float], sizes: tuple[tuple[int, int], ...], pixels: int
) -> list[tuple[int, int]]:
    """Round references of ideal ``areas`` (aspects of ``sizes``) to multiples of 32, total <= ``pixels``."""
    boxes: list[tuple[int, int]] = []
    ideals: list[tuple[float, float] | None] = []
    for area, (w, h) in zip(areas, sizes, strict=True):
        ratio = w / h
        ideal_w, ideal_h = _ideal_sides(area, ratio)
        if min(ideal_w, ideal_h) >= _REF_MULTIPLE:
            boxes.append(calculate_dimensions(area, ratio))
            ideals.append((ideal_w, ideal_h))
            continue
        # Too thin (or too small) for the 32 px minimum: keep the area, not the aspect, and never grow it.
        long_side = max(_REF_MULTIPLE, _floor_to(area / _REF_MULTIPLE, _REF_MULTIPLE))
        boxes.append((long_side, _REF_MULTIPLE) if ratio >= 1 else (_REF_MULTIPLE, long_side))
        ideals.append(None)
    return _shrink_to_fit(boxes, ideals, pixels, _REF_MULTIPLE)


def _proportional_areas(sizes: tuple[tuple[int, int], ...], pixels: int) -> list[float]:
    """Areas ``s^2 * w * h`` summing to ``pixels``; images under 32x32 are pinned there, the rest rescaled."""
    source = [w * h for w, h in sizes]
    pinned: set[int] = set()
    while True:
        free = [i for i in range(len(sizes)) if i not in pinned]
        if not free:
            break
        scale2 = (pixels - _MIN_REF_AREA * len(pinned)) / sum(source[i] for i in free)
        grown = {i for i in free if source[i] * scale2 < _MIN_REF_AREA}
        if not grown:
            break
        pinned |= grown
    return [float(_MIN_REF_AREA) if i in pinned else source[i] * scale2 for i in range(len(sizes))]


# ---------------------------------------------------------------------------------------------------------
# Target
# ---------------------------------------------------------------------------------------------------------


def _floor16(value: int) -> int:
    return value // PIXELS_PER_TOKEN_SIDE * PIXELS_PER_TOKEN_SIDE


def _target_from_aspect(pixels: int, ratio: float, exact: bool) -> tuple[int, int]:
    width, height = (_floor16(v) for v in calculate_dimensions(pixels, ratio))
    if min(width, height) < PIXELS_PER_TOKEN_SIDE:
        raise PackingError(
            f"The last reference's aspect ({ratio:.4g}) is too extreme to derive an output size.",
            hint="pass width and height.",
        )
    if exact or width * height <= pixels:
        return width, height
    ideal = _ideal_sides(pixels, ratio)
    ((width, height),) = _shrink_to_fit([(width, height)], [ideal], pixels, PIXELS_PER_TOKEN_SIDE)
    return width, height


def target_size(
    sizes: Sequence[tuple[int, int]],
    budget: Budget | int,
    width: int | None = None,
    height: int | None = None,
    policy: str = "self",
) -> tuple[int, int]:
    """Output (target) size in pixels, sides multiples of 16.

    * ``width`` and ``height`` given: each floored to a multiple of 16.
    * Neither given: the aspect of the LAST reference at area ``B`` via :func:`calculate_dimensions`, floored
      to 16 (diffusers' rule at ``B = 1024^2``). Under ``self``/``proportional``, when that rounding lands
      above ``B`` (e.g. 4:3 -> 1184x896 at 1024^2), the most over-rounded side is floored to 16 until it fits;
      ``per-image`` keeps diffusers' result as is.
    * One given: ``self``/``proportional`` derive the other from the last reference's aspect (nearest
      multiple of 16); ``per-image`` takes the other from diffusers' rule at area ``B``, as diffusers does.

    Args:
        sizes (Sequence[tuple[int, int]]): reference ``(w, h)``; may be empty when both sides are given.
        budget (Budget | int): the budget (an int is a pixel count or a trained side, see :func:`as_budget`).
        width, height (int | None, default None): requested output size.
        policy (str, default "self"): packing policy (affects the rules above only).

    Returns:
        tuple[int, int]: ``(width, height)``.

    Raises:
        PackingError: no references and not both sides given; a side under 16 px; a requested size above
            the budget.
    """
    bounds = as_budget(budget)
    pixels = bounds.pixels
    _check_policy(policy)
    sizes = _check_sizes(sizes)
    if width is None or height is None:
        if not sizes:
            raise PackingError(
                "Without reference images the output size cannot be derived.", hint="pass width and height."
            )
        ratio = sizes[-1][0] / sizes[-1][1]
        if width is None and height is None:
            return _target_from_aspect(pixels, ratio, exact=policy == "per-image")
        if policy == "per-image":
            derived_w, derived_h = calculate_dimensions(pixels, ratio)
            width = derived_w if width is None else width
            height = derived_h if height is None else height
        elif width is None and height is not None:
            width = round(_floor16(height) * ratio / PIXELS_PER_TOKEN_SIDE) * PIXELS_PER_TOKEN_SIDE
        elif width is not None:
            height = round(_floor16(width) / ratio / PIXELS_PER_TOKEN_SIDE) * PIXELS_PER_TOKEN_SIDE
    assert width is not None and height is not None  # every branch above sets both
    width, height = _floor16(operator.index(width)), _floor16(operator.index(height))
    if width < PIXELS_PER_TOKEN_SIDE or height < PIXELS_PER_TOKEN_SIDE:
        raise PackingError(
            f"Output size {width}x{height} (after flooring to multiples of 16) is too small.",
            hint="use a width and height of at least 16 px.",
        )
    if width * height > pixels:
        raise PackingError(
            f"Output size {width}x{height} ({width * height} px) exceeds the {bounds} budget ({pixels} px).",
            hint="choose a larger budget or a smaller width/height.",
        )
    return width, height


# ---------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------


def pack_references(
    sizes: Sequence[tuple[int, int]],
    budget: Budget | int,
    policy: str = "self",
    width: int | None = None,
    height: int | None = None,
) -> PackedLayout:
    """Size the target and the references of one request and lay their tokens out in one sequence.

    Args:
        sizes (Sequence[tuple[int, int]]): ``(w, h)`` of the reference images, in order; may be empty.
        budget (Budget | int): the budget; an int is a pixel count (``1048576``) or a trained side (``1024``).
        policy (str, default "self"): one of ``POLICIES``.
        width, height (int | None, default None): output size; see :func:`target_size`.

    Returns:
        PackedLayout: target first (offset 0), then the references in input order.

    Raises:
        PackingError: unknown policy; non-positive budget or image size; more than ``max_references(budget)``
            references (``self``/``proportional``); an output size that cannot be derived or exceeds the budget.
    """
    bounds = as_budget(budget)
    pixels = bounds.pixels
    _check_policy(policy)
    sizes = _check_sizes(sizes)
    if policy != "per-image":  # per-image mirrors diffusers, which has no count limit (each ref gets area B)
        _check_count(len(sizes), bounds)
    target_w, target_h = target_size(sizes, bounds, width, height, policy=policy)

    if not sizes:
        boxes: list[tuple[int, int]] = []
    elif policy == "per-image":
        boxes = [calculate_dimensions(pixels, w / h) for w, h in sizes]
        for i, (box, size) in enumerate(zip(boxes, sizes, strict=True), start=1):
            if min(box) < _REF_MULTIPLE:
                raise PackingError(
                    f"Reference {i} ({size[0]}x{size[1]}) is too elongated for the per-image policy: "
                    f"it rounds to {box[0]}x{box[1]}.",
                    hint="use the self policy or crop the image.",
                )
    elif policy == "self":
        boxes = _fit_references([pixels / len(sizes)] * len(sizes), sizes, pixels)
    else:
        boxes = _fit_references(_proportional_areas(sizes, pixels), sizes, pixels)

    target = ImageSlot("target", 0, target_w, target_h, 0)
    references = []
    offset = target.num_tokens
    for index, (w, h) in enumerate(boxes, start=1):
        slot = ImageSlot("reference", index, w, h, offset)
        references.append(slot)
        offset += slot.num_tokens
    return PackedLayout(bounds, policy, target, tuple(references), sizes)
