"""Tests for SELF packing (``runtime/packing.py``).

Bounds checked by the property tests (output sides ``w``, ``h`` of a reference):

* Every reference side ends in ``(ideal - 32, ideal + 16]`` (nearest multiple of 32, floored when the sum must
  shrink), hence ``|log(aspect_out / aspect_in)| < log(1 + 32/w) + log(1 + 32/h)``. Measured over 60k random
  requests (1-10 references, sides 16..8192, aspects 1:8..8:1, all three budgets) the error reaches 0.81x
  that bound; the worst absolute error is 0.13 (about 14 %) for ``self`` and 0.50 for ``proportional``, whose
  small references can get short sides near 32 px.
* ``self`` gives each reference an area within the same bound of ``B/N``:
  ``|log(area / (B/N))| < log(1 + 32/w) + log(1 + 32/h)``; measured worst 0.98x the bound, 0.20 absolute
  (about 22 %). The reference areas always sum to at most ``B``; measured fill is at least 92 % of ``B``.
* Clamped references (a side at the 32 px minimum) keep neither bound and are only checked for size rules.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uniref_deploy.runtime.budget import trained_budgets
from uniref_deploy.runtime.errors import PackingError
from uniref_deploy.runtime.packing import (
    POLICIES,
    ImageSlot,
    PackedLayout,
    as_budget,
    calculate_dimensions,
    max_references,
    pack_references,
    target_size,
)

BUDGETS = {b.side: b.pixels for b in trained_budgets()}  # side -> pixels
SIDES = st.integers(16, 8192)


@st.composite
def image_size(draw: st.DrawFn) -> tuple[int, int]:
    """A (w, h) with sides 16..8192 and aspect between 1:8 and 8:1."""
    w = draw(SIDES)
    h = draw(st.integers(max(16, math.ceil(w / 8)), min(8192, 8 * w)))
    return w, h


REQUESTS = st.tuples(
    st.lists(image_size(), min_size=1, max_size=10),
    st.sampled_from(sorted(BUDGETS)),
    st.sampled_from(["self", "proportional"]),
)


def _rounding_bound(slot: ImageSlot) -> float:
    return math.log1p(32 / slot.width) + math.log1p(32 / slot.height)


def _aspect_error(slot: ImageSlot, size: tuple[int, int]) -> float:
    return abs(math.log((slot.width / slot.height) / (size[0] / size[1])))


def _diffusers_target(size: tuple[int, int]) -> tuple[int, int]:
    # Qwen-Image-Edit-Plus: calculate_dimensions(1024 * 1024, w / h), then floor to vae_scale_factor * 2.
    w, h = calculate_dimensions(1024 * 1024, size[0] / size[1])
    return w // 16 * 16, h // 16 * 16


# ---------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(REQUESTS)
def test_layout_invariants(request: tuple) -> None:
    sizes, budget, policy = request
    layout = pack_references(sizes, budget, policy)
    pixels = BUDGETS[budget]

    assert layout.budget.pixels == pixels and layout.policy == policy
    assert layout.source_sizes == tuple(sizes)
    assert layout.reference_area <= pixels
    assert layout.target.width * layout.target.height <= pixels
    assert layout.target.width % 16 == 0 and layout.target.height % 16 == 0
    assert len(layout.references) == len(sizes)

    offset = 0
    for index, slot in enumerate(layout.slots):
        assert slot.index == index
        assert slot.role == ("target" if index == 0 else "reference")
        assert slot.token_offset == offset
        assert slot.num_tokens == slot.grid_h * slot.grid_w == slot.width * slot.height // 256
        assert (slot.latent_h, slot.latent_w) == (2 * slot.grid_h, 2 * slot.grid_w)
        offset += slot.num_tokens
    assert offset == layout.num_image_tokens == layout.num_target_tokens + layout.num_reference_tokens
    assert layout.grids == tuple((s.grid_h, s.grid_w) for s in layout.slots)

    for slot in layout.references:
        assert slot.width % 32 == 0 and slot.height % 32 == 0
        assert min(slot.width, slot.height) >= 32


@settings(max_examples=200, deadline=None)
@given(REQUESTS)
def test_aspect_error_is_bounded(request: tuple) -> None:
    """Unclamped references keep their aspect within ``log(1 + 32/w) + log(1 + 32/h)``."""
    sizes, budget, policy = request
    layout = pack_references(sizes, budget, policy)
    for slot, size in zip(layout.references, sizes, strict=True):
        if min(slot.width, slot.height) > 32:
            assert _aspect_error(slot, size) < _rounding_bound(slot)


@settings(max_examples=150, deadline=None)
@given(st.lists(image_size(), min_size=1, max_size=10), st.sampled_from(sorted(BUDGETS)))
def test_self_gives_each_reference_its_share(sizes: list, budget: int) -> None:
    """Each ``self`` reference has area ``B/N`` within ``log(1 + 32/w) + log(1 + 32/h)``."""
    layout = pack_references(sizes, budget, "self")
    share = BUDGETS[budget] / len(sizes)
    for slot in layout.references:
        assert abs(math.log(slot.width * slot.height / share)) < _rounding_bound(slot)


@settings(max_examples=150, deadline=None)
@given(st.lists(image_size(), min_size=2, max_size=10), st.sampled_from(sorted(BUDGETS)))
def test_proportional_uses_one_scale(sizes: list, budget: int) -> None:
    """Unclamped ``proportional`` references share one scale up to their rounding bounds."""
    layout = pack_references(sizes, budget, "proportional")
    scaled = [
        (math.log(slot.width * slot.height / (w * h)), _rounding_bound(slot))
        for slot, (w, h) in zip(layout.references, sizes, strict=True)
        if min(slot.width, slot.height) > 32
    ]
    for log_a, bound_a in scaled:
        for log_b, bound_b in scaled:
            assert abs(log_a - log_b) < bound_a + bound_b


@settings(max_examples=100, deadline=None)
@given(image_size(), st.sampled_from(sorted(BUDGETS)))
def test_default_target_follows_diffusers_rule_within_budget(size: tuple, budget: int) -> None:
    pixels = BUDGETS[budget]
    w, h = calculate_dimensions(pixels, size[0] / size[1])
    exact = (w // 16 * 16, h // 16 * 16)
    assert target_size([size], budget, policy="per-image") == exact
    got = target_size([size], budget)
    assert got[0] * got[1] <= pixels
    if exact[0] * exact[1] <= pixels:
        assert got == exact
    else:  # shrunk by flooring sides to 16: never larger, at most one 32 step below on a side
        assert exact[0] - 32 <= got[0] <= exact[0] and exact[1] - 32 <= got[1] <= exact[1]


# ---------------------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # importing diffusers pulls in torch (seconds); the comparison itself is instant
def test_per_image_matches_diffusers() -> None:
    pytest.importorskip("diffusers")
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as reference

    sides = [16, 100, 333, 512, 640, 768, 1000, 1023, 1024, 1080, 1920, 4096, 8192]
    sizes = [(w, h) for w in sides for h in sides]
    for w, h in sizes:
        assert calculate_dimensions(1024 * 1024, w / h) == reference(1024 * 1024, w / h)
    for start in range(0, len(sizes), 16):
        chunk = sizes[start : start + 16]
        layout = pack_references(chunk, 1024, "per-image")
        for slot, (w, h) in zip(layout.references, chunk, strict=True):
            assert (slot.width, slot.height) == reference(1024 * 1024, w / h)
        assert (layout.target.width, layout.target.height) == _diffusers_target(chunk[-1])


@pytest.mark.parametrize("size", [(1024, 1024), (800, 600), (1920, 1080), (1000, 1500), (640, 4000)])
def test_target_matches_diffusers_at_1024(size: tuple[int, int]) -> None:
    assert target_size([(512, 512), size], 1024, policy="per-image") == _diffusers_target(size)
    got = target_size([(512, 512), size], 1024)
    assert got[0] * got[1] <= 1024 * 1024
    if _diffusers_target(size)[0] * _diffusers_target(size)[1] <= 1024 * 1024:
        assert got == _diffusers_target(size)


def test_target_over_budget_is_shrunk_not_refused() -> None:
    # diffusers gives 1184x896 (1.2 % over 1024^2) for 4:3; self floors the most over-rounded side.
    assert _diffusers_target((800, 600)) == (1184, 896)
    w, h = target_size([(800, 600)], 1024)
    assert w * h <= 1024 * 1024 and (w, h) == (1184, 880)


def test_explicit_and_partial_target_sizes() -> None:
    assert target_size([(1000, 500)], 1024, width=1000, height=509) == (992, 496)
    assert target_size([(1000, 500)], 1024, width=1024) == (1024, 512)
    assert target_size([(1000, 500)], 1024, height=400) == (800, 400)
    # per-image mirrors diffusers: the missing side comes from the rule at area B, independent of the other.
    assert target_size([(1000, 500)], 1024, width=512, policy="per-image") == (512, 736)


def test_zero_references_need_an_explicit_size() -> None:
    layout = pack_references([], 1024, width=512, height=768)
    assert layout.references == () and layout.num_image_tokens == 32 * 48 == layout.num_target_tokens
    assert layout.reference_area == 0


def test_budget_coercion_and_max_references() -> None:
    assert as_budget(1024).pixels == 1024 * 1024 == as_budget(1024 * 1024).pixels
    assert as_budget(2048).pixels == 2048 * 2048 and as_budget(64 * 64).pixels == 4096
    assert as_budget(8193).pixels == 8193
    assert [max_references(side) for side in sorted(BUDGETS)] == [16, 36, 64]
    assert len(pack_references([(300, 200)] * 64, 2048).references) == 64
    assert set(POLICIES) == {"self", "proportional", "per-image"}


def test_self_example_fills_shares() -> None:
    layout = pack_references([(1024, 768), (512, 512), (600, 1800)], 1024)
    assert [(s.width, s.height) for s in layout.references] == [(672, 512), (576, 576), (352, 1024)]
    assert layout.reference_area <= 1024 * 1024
    assert layout.grids[0] == (1760 // 16, 576 // 16)  # target: aspect of the last reference (1:3)


def test_proportional_pins_tiny_references() -> None:
    layout = pack_references([(8192, 8192), (16, 16), (8192, 4096)], 1024, "proportional")
    assert (layout.references[1].width, layout.references[1].height) == (32, 32)
    assert layout.reference_area <= 1024 * 1024


def test_thin_reference_keeps_area_not_aspect() -> None:
    layout = pack_references([(8192, 16)] * 16, 1024, "self", width=512, height=512)
    for slot in layout.references:
        assert slot.height == 32 and slot.width * slot.height <= 1024 * 1024 // 16
    assert layout.reference_area <= 1024 * 1024


def test_layout_key_and_dict() -> None:
    layout = pack_references([(640, 480), (480, 640)], 1536, "proportional")
    assert hash(layout.key()) == hash(pack_references([(640, 480), (480, 640)], 1536, "proportional").key())
    data = json.loads(json.dumps(layout.to_dict()))
    assert data["budget"] == 1536 * 1536 and data["policy"] == "proportional"
    assert [r["token_offset"] for r in data["references"]] == [s.token_offset for s in layout.references]
    assert isinstance(layout, PackedLayout)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sizes": [(512, 512)], "budget": 1024, "policy": "fancy"}, "Unknown packing policy"),
        ({"sizes": [(512, 0)], "budget": 1024}, "positive width and height"),
        ({"sizes": [(-3, 512)], "budget": 1024}, "positive width and height"),
        ({"sizes": [(512, 512)] * 17, "budget": 1024}, "fewer references or a larger budget"),
        ({"sizes": [(512, 512)] * 17, "budget": 1024, "policy": "proportional"}, "at most 16"),
        ({"sizes": [(512, 512)], "budget": 0}, "Budget must be positive"),
        ({"sizes": [(512, 512)], "budget": -1024}, "Budget must be positive"),
        ({"sizes": [(512, 512)], "budget": "1024"}, "Budget must be an integer"),
        ({"sizes": [], "budget": 1024}, "pass width and height"),
        ({"sizes": [], "budget": 1024, "width": 512}, "pass width and height"),
        ({"sizes": [(512, 512)], "budget": 1024, "width": 8, "height": 512}, "at least 16"),
        ({"sizes": [(512, 512)], "budget": 1024, "width": 2048, "height": 2048}, "choose a larger budget"),
        ({"sizes": [(512, 512)], "budget": 1024, "width": 2048}, "choose a larger budget"),
        ({"sizes": [(1, 5000), (512, 512)], "budget": 1024, "policy": "per-image"}, "beyond the 512:1 limit"),
        ({"sizes": [(1, 50000)], "budget": 1024}, "crop or pad it nearer to square"),
        ({"sizes": [(8, 4096)], "budget": 64 * 64, "policy": "per-image", "width": 32, "height": 32}, "too elongated"),
        ({"sizes": [(1, 1000)], "budget": 1024}, "aspect of 1000:1"),
    ],
)
def test_errors_say_what_to_change(kwargs: dict, match: str) -> None:
    with pytest.raises(PackingError, match=match):
        pack_references(**kwargs)
