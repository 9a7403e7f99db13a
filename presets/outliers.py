"""Activation outliers, as trained DiTs show them, injected into a preset's transformer without changing its output.

Trained DiTs carry a few input channels of the attention and MLP linears at tens of times the median magnitude:
the adaLN modulation's ``(1 + scale)`` and ``shift`` are large on those channels. Random presets have none, so
per-tensor quantization looks better on them than it would on a real model. ``inject_outliers`` reproduces the
mechanism (SmoothQuant's migration run backwards): on chosen channels ``c`` of each block it multiplies the
modulation's ``shift`` and ``1 + scale`` by a factor ``s`` (rows of ``img_mod``/``txt_mod``) and divides the
matching input columns of the consumers (``to_q/to_k/to_v``, ``add_q/k/v_proj``, the MLPs' first linear) by ``s``.
In exact arithmetic the transformer computes the same function; its activations at those linears' inputs carry
channels ``s`` times larger.

Layout of a block's modulation output (diffusers' ``QwenImageTransformerBlock``): six ``dim``-wide chunks,
``shift1, scale1, gate1`` (attention input) then ``shift2, scale2, gate2`` (MLP input).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

OUTLIER_FORMAT_VERSION = 1
# Sites: (name, modulation module, chunk index of shift within the six, consumer linears' attribute paths).
_SITES: tuple[tuple[str, str, int, tuple[str, ...]], ...] = (
    ("img_attn", "img_mod", 0, ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn", "txt_mod", 0, ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_mlp", "img_mod", 3, ("img_mlp.net.0.proj",)),
    ("txt_mlp", "txt_mod", 3, ("txt_mlp.net.0.proj",)),
)


@dataclass(frozen=True)
class OutlierSpec:
    """How many channels per linear input carry an outlier, and the factor range (log-uniform) they get.

    ``channels`` None picks ``max(1, dim // 192)``: 1 on ``tiny`` (32 wide), 4 on ``small`` (768 wide).
    """

    channels: int | None = None
    min_factor: float = 20.0
    max_factor: float = 100.0


def inject_outliers(transformer: Any, seed: int, spec: OutlierSpec | None = None) -> dict[str, Any]:
    """Scale outlier channels into ``transformer``'s linear inputs in place, function-preserving; return the record.

    The same channels are used by every block and site (trained models' outliers persist across layers); the factor
    of each (block, site, channel) is drawn log-uniformly from ``[min_factor, max_factor]`` with ``seed``.

    Args:
        transformer: a diffusers ``QwenImageTransformer2DModel`` (fp32 preferred; modified in place).
        seed (int): seeds the channel choice and the factors.
        spec (OutlierSpec | None): sizes; None uses the defaults.

    Returns:
        dict: JSON-ready record (channels, factor range, per-block factors) for ``preset.json``.
    """
    import numpy as np
    import torch

    spec = spec or OutlierSpec()
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    n = spec.channels if spec.channels is not None else max(1, dim // 192)
    rng = np.random.default_rng([seed, zlib.crc32(b"outliers")])
    channels = sorted(int(c) for c in rng.choice(dim, size=n, replace=False))
    lo, hi = np.log(spec.min_factor), np.log(spec.max_factor)
    factors: list[dict[str, list[float]]] = []
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            per_site = {}
            for site, mod_name, shift_chunk, consumers in _SITES:
                s = [round(float(x), 3) for x in np.exp(rng.uniform(lo, hi, n))]
                _scale_site(block, mod_name, shift_chunk, consumers, dim, channels, s)
                per_site[site] = s
            factors.append(per_site)
    return {
        "version": OUTLIER_FORMAT_VERSION,
        "channels": channels,
        "factor_range": [spec.min_factor, spec.max_factor],
        "sites": [site for site, *_ in _SITES],
        "factors": factors,
    }


def _scale_site(block: Any, mod_name: str, shift_chunk: int, consumers: tuple[str, ...], dim: int,
                channels: list[int], factors: list[float]) -> None:
    """Multiply ``shift`` and ``1 + scale`` of ``channels`` by ``factors``; divide the consumers' columns back."""
    import torch

    mod = getattr(block, mod_name)[1]  # Sequential(SiLU, Linear)
    s = torch.tensor(factors, dtype=mod.weight.dtype)
    shift_rows = torch.tensor([shift_chunk * dim + c for c in channels])
    scale_rows = shift_rows + dim
    mod.weight[shift_rows] *= s[:, None]
    mod.bias[shift_rows] *= s
    mod.weight[scale_rows] *= s[:, None]
    mod.bias[scale_rows] = s * mod.bias[scale_rows] + (s - 1.0)  # 1 + scale' == s * (1 + scale)
    cols = torch.tensor(channels)
    for path in consumers:
        linear = block.get_submodule(path)
        linear.weight[:, cols] /= s.to(linear.weight.dtype)
