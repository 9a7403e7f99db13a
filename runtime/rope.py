"""Real-valued RoPE tables for Qwen-Image(-Edit) DiTs, computed on the host with numpy.

Follows ``QwenEmbedRope`` (``scale_rope=True``), ``apply_rotary_emb_qwen`` and the ``zero_cond_t`` modulation index
of ``diffusers/models/transformers/transformer_qwenimage.py`` (diffusers 0.42.1). diffusers builds complex
``torch.polar`` tables, which do not export to ONNX; here the same rotation is given as float32 ``cos``/``sin``
tables that the exported DiT takes as graph inputs (see DESIGN.md, "RoPE and the exported DiT graph").

Layout. Each pair ``(x[2k], x[2k+1])`` of a head is one complex number rotated by angle ``pos * inv_freq[k]``.
The ``head_dim // 2`` pair columns are split over three axes, in this order: frame, height, width. Image ``i`` of
the sequence (target first, then references) has frame position ``i``; its ``h x w`` tokens are row-major with
centred positions ``-(h - h // 2) .. h // 2 - 1`` for rows (likewise columns). Text tokens use the same position on
all three axes, starting after the largest image's half-extent.

Float32 rounding. diffusers computes ``inv_freq = 1 / pow(theta, arange(0, d, 2) / d)`` in float32 with torch on
the CPU and multiplies it by integer positions in float32. Angles reach ~4000 rad for text tokens, so a 1-ulp
difference in ``inv_freq`` would show up as ~2e-4 in ``cos``/``sin``. This module reproduces the float32 exponent
and reciprocal exactly and takes ``pow`` correctly rounded (float64 then cast), which equals torch's scalar
``powf`` path for every axis width up to 64 at ``theta=10000`` (checked with torch 2.14 on x86-64). torch's SIMD
``pow`` (Sleef; it takes the leading multiple of 32 elements on AVX-512, of 16 on AVX2) can be 1 ulp off: forced
onto that path, column 11 of a 56-wide axis moves by 1.9e-9 rad per position, < 1e-5 rad at position 4095, far
below bfloat16 resolution.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError

#: diffusers precomputes 4096 positive (0..4095) and 4096 negative (-4096..-1) positions; anything past that is
#: silently truncated there, so it is an error here.
MAX_POSITIONS = 4096

Grid = tuple[int, int]


@dataclass(frozen=True)
class RopeConfig:
    """RoPE settings of one DiT.

    Attributes:
        theta: base of the frequency ladder (diffusers hard-codes 10000 for Qwen-Image).
        axes_dim: head dims given to the (frame, height, width) axes; each even, sum == attention head dim.
        scale_rope: centre image positions on 0 (Qwen-Image always uses True).
    """

    theta: int = 10000
    axes_dim: tuple[int, int, int] = (16, 56, 56)
    scale_rope: bool = True

    def __post_init__(self) -> None:
        axes = tuple(int(d) for d in self.axes_dim)
        if len(axes) != 3 or any(d <= 0 or d % 2 for d in axes):
            raise InputError(
                f"RoPE axes_dim must be three positive even numbers, got {self.axes_dim}.",
                hint="use the transformer's axes_dims_rope, e.g. (16, 56, 56).",
            )
        if self.theta <= 0:
            raise InputError(f"RoPE theta must be positive, got {self.theta}.")
        object.__setattr__(self, "axes_dim", axes)

    @classmethod
    def from_transformer_config(cls, cfg: dict) -> RopeConfig:
        """Build from a diffusers ``QwenImageTransformer2DModel`` config dict (reads ``axes_dims_rope``).

        Raises:
            InputError: the config asks for the layer-3D RoPE variant, or its axes do not sum to the head dim.
        """
        if cfg.get("use_layer3d_rope", False):
            raise InputError(
                "use_layer3d_rope=True selects QwenEmbedLayer3DRope, which runtime/rope.py does not implement."
            )
        config = cls(axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))))
        head_dim = cfg.get("attention_head_dim")
        if head_dim is not None and config.head_dim != int(head_dim):
            raise InputError(
                f"axes_dims_rope {config.axes_dim} sums to {config.head_dim}, but attention_head_dim is {head_dim}.",
                hint="the RoPE axes must cover the whole attention head.",
            )
        return config

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dim)

    @property
    def half_dim(self) -> int:
        return self.head_dim // 2


def _inv_freq(dim: int, theta: int) -> np.ndarray:
    """float32 ``1 / theta ** (arange(0, dim, 2) / dim)`` rounded as diffusers' torch code rounds it."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)  # float32 divide, as torch .div(dim)
    power = np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def _axis_inv_freqs(config: RopeConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f, h, w = config.axes_dim
    return _inv_freq(f, config.theta), _inv_freq(h, config.theta), _inv_freq(w, config.theta)


def _cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angles as float32 products (like torch.outer), then cos/sin evaluated in float64 and rounded."""
    angles = (positions.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)  # [P, k]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _axis_positions(n: int, scale_rope: bool) -> np.ndarray:
    if scale_rope:
        return np.arange(-(n - n // 2), n // 2, dtype=np.int64)
    return np.arange(n, dtype=np.int64)


def _normalize_grids(grids: Sequence[Sequence[int]]) -> tuple[Grid, ...]:
    out = []
    for i, g in enumerate(grids):
        try:
            h, w = (int(v) for v in g)
        except (TypeError, ValueError) as err:
            raise InputError(f"grid {i} must be a (grid_h, grid_w) pair, got {g!r}.") from err
        if h <= 0 or w <= 0:
            raise InputError(f"grid {i} must have positive sides, got {(h, w)}.")
        out.append((h, w))
    if not out:
        raise InputError("at least one image grid (the target) is required.")
    if len(out) > MAX_POSITIONS:
        raise InputError(f"{len(out)} images exceed the {MAX_POSITIONS} frame positions of the RoPE table.")
    return tuple(out)


def _check_extent(n: int, scale_rope: bool, what: str) -> None:
    limit = 2 * MAX_POSITIONS if scale_rope else MAX_POSITIONS
    if n > limit:
        raise InputError(f"{what} of {n} tokens exceeds the RoPE table ({limit} positions).")


def text_start(grids: Sequence[Sequence[int]], config: RopeConfig) -> int:
    """First text position: the largest image half-extent (``scale_rope``) or full extent over all images."""
    if config.scale_rope:
        return max(max(h // 2, w // 2) for h, w in _normalize_grids(grids))
    return max(max(h, w) for h, w in _normalize_grids(grids))


def image_rope(grids: Sequence[tuple[int, int]], config: RopeConfig) -> tuple[np.ndarray, np.ndarray]:
    """RoPE tables of the image tokens.

    Args:
        grids: ``(grid_h, grid_w)`` token grid of each image in sequence order, target first; the list position
            is the frame position.
        config: the model's RoPE settings.

    Returns:
        float32 ``(cos, sin)``, each ``[sum(h * w), head_dim // 2]``, read in (frame, height, width) column order.

    Raises:
        InputError: empty or non-positive grids, or positions past diffusers' 4096-entry table.
    """
    grids = _normalize_grids(grids)
    inv_f, inv_h, inv_w = _axis_inv_freqs(config)
    cos_parts: list[np.ndarray] = []
    sin_parts: list[np.ndarray] = []
    for idx, (h, w) in enumerate(grids):
        _check_extent(h, config.scale_rope, "grid height")
        _check_extent(w, config.scale_rope, "grid width")
        f_cos, f_sin = _cos_sin(np.array([idx]), inv_f)  # [1, f/2]
        h_cos, h_sin = _cos_sin(_axis_positions(h, config.scale_rope), inv_h)  # [h, h_dim/2]
        w_cos, w_sin = _cos_sin(_axis_positions(w, config.scale_rope), inv_w)  # [w, w_dim/2]
        for parts, f_t, h_t, w_t in ((cos_parts, f_cos, h_cos, w_cos), (sin_parts, f_sin, h_sin, w_sin)):
            table = np.concatenate(
                [
                    np.broadcast_to(f_t[None, :, :], (h, w, f_t.shape[1])),
                    np.broadcast_to(h_t[:, None, :], (h, w, h_t.shape[1])),
                    np.broadcast_to(w_t[None, :, :], (h, w, w_t.shape[1])),
                ],
                axis=-1,
            )  # [h, w, half_dim], row-major tokens
            parts.append(table.reshape(h * w, config.half_dim))
    return np.concatenate(cos_parts, axis=0), np.concatenate(sin_parts, axis=0)


def text_rope(
    grids: Sequence[tuple[int, int]], text_len: int, config: RopeConfig
) -> tuple[np.ndarray, np.ndarray]:
    """RoPE tables of ``text_len`` text tokens placed after the image grids.

    Returns:
        float32 ``(cos, sin)``, each ``[text_len, head_dim // 2]``.

    Raises:
        InputError: ``text_len`` < 1, or the text runs past position 4095 (diffusers would truncate the table).
    """
    text_len = int(text_len)
    if text_len < 1:
        raise InputError(f"text_len must be at least 1, got {text_len}.")
    start = text_start(grids, config)
    if start + text_len > MAX_POSITIONS:
        raise InputError(
            f"text of {text_len} tokens starting at RoPE position {start} runs past the {MAX_POSITIONS}-entry table.",
            hint=f"shorten the prompt to at most {MAX_POSITIONS - start} tokens.",
        )
    inv = np.concatenate(_axis_inv_freqs(config))
    return _cos_sin(np.arange(start, start + text_len), inv)


def modulation_index(grids: Sequence[tuple[int, int]]) -> np.ndarray:
    """Edit-2511 ``zero_cond_t`` selector: int32 ``[S_img]``, 0 on target tokens, 1 on reference tokens."""
    grids = _normalize_grids(grids)
    target = grids[0][0] * grids[0][1]
    refs = sum(h * w for h, w in grids[1:])
    return np.concatenate([np.zeros(target, np.int32), np.ones(refs, np.int32)])


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate interleaved pairs of ``x`` ``[..., S, H, D]`` by tables ``[S, D // 2]`` (reference definition).

    Each ``(x[..., 2k], x[..., 2k+1])`` is multiplied, as a complex number, by ``cos[:, k] + i sin[:, k]``;
    computed in float32 and returned in ``x``'s dtype, like ``apply_rotary_emb_qwen(..., use_real=False)``.
    """
    xf = np.asarray(x).astype(np.float32, copy=False)
    if (
        xf.ndim < 3
        or xf.shape[-1] % 2
        or cos.shape != (xf.shape[-3], xf.shape[-1] // 2)
        or sin.shape != cos.shape
    ):
        raise InputError(
            f"apply_rope expects x [..., S, H, D] and cos/sin [S, D/2]; got x {xf.shape}, cos {cos.shape}, "
            f"sin {sin.shape}."
        )
    c = cos.astype(np.float32, copy=False)[:, None, :]  # [S, 1, D/2]
    s = sin.astype(np.float32, copy=False)[:, None, :]
    even, odd = xf[..., 0::2], xf[..., 1::2]
    out = np.empty_like(xf)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = even * s + odd * c
    return out.astype(np.asarray(x).dtype, copy=False)


class RopeCache:
    """Thread-safe LRU cache of RoPE tables per sequence layout.

    Returned arrays are shared between callers and marked read-only.
    """

    def __init__(self, config: RopeConfig, maxsize: int = 64):
        if maxsize < 1:
            raise InputError(f"RopeCache maxsize must be at least 1, got {maxsize}.")
        self.config = config
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def tables(self, grids: Sequence[tuple[int, int]], text_len: int) -> dict[str, np.ndarray]:
        """``{"img_cos", "img_sin", "txt_cos", "txt_sin"}`` for this layout, computed once per key."""
        key = (_normalize_grids(grids), int(text_len), self.config)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        img_cos, img_sin = image_rope(key[0], self.config)
        txt_cos, txt_sin = text_rope(key[0], key[1], self.config)
        entry = {"img_cos": img_cos, "img_sin": img_sin, "txt_cos": txt_cos, "txt_sin": txt_sin}
        for arr in entry.values():
            arr.flags.writeable = False
        with self._lock:
            entry = self._entries.setdefault(key, entry)  # another thread may have filled it meanwhile
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return entry
