"""Reduced-precision graphs: fp16/bf16 casting with measured fp32 islands.

Layers whose activations exceed what fp16 holds (with a safety margin) stay fp32 in the fp16 graph. The decision
comes from measured per-layer maxima on calibration-like inputs, recorded in the manifest next to the graph.

    before (fp16):  x16 -> Linear16 -> y16 (overflows to inf)
    after:          x16 -> Cast(f32) -> Linear32 -> Cast(f16) -> y16   (only for layers over the threshold)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from uniref_deploy.runtime.precision import FP16_MAX

FP16_SAFETY = 4.0  # keep layers whose |activation| exceeds FP16_MAX / FP16_SAFETY in fp32
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MEASURED_TYPES = (nn.Linear, nn.LayerNorm, nn.GELU)


@torch.no_grad()
def measure_activation_ranges(module: nn.Module, samples: Iterable[tuple]) -> dict[str, float]:
    """Largest |output| of every Linear/LayerNorm/RMSNorm/GELU layer and every block over ``samples``."""
    ranges: dict[str, float] = {}
    handles = []

    def hook(name):
        def record(_mod, _inp, out):
            outs = out if isinstance(out, tuple) else (out,)
            peak = max((float(o.detach().abs().max()) for o in outs if torch.is_tensor(o) and o.numel()), default=0.0)
            ranges[name] = max(ranges.get(name, 0.0), peak)
        return record

    for name, mod in module.named_modules():
        if isinstance(mod, MEASURED_TYPES) or type(mod).__name__ in ("RMSNorm", "QwenImageTransformerBlock"):
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        for args in samples:
            module(*args)
    finally:
        for h in handles:
            h.remove()
    return ranges


def fp16_overflow_layers(module: nn.Module, ranges: dict[str, float], safety: float = FP16_SAFETY) -> list[str]:
    """Names of leaf layers (Linear, norms, GELU) whose measured maximum is too close to fp16's range."""
    limit = FP16_MAX / safety
    names = []
    for name, peak in ranges.items():
        mod = module.get_submodule(name)
        if peak > limit and (isinstance(mod, MEASURED_TYPES) or type(mod).__name__ == "RMSNorm"):
            names.append(name)
    return sorted(names)


class Float32Island(nn.Module):
    """Runs ``inner`` in fp32 and returns the surrounding dtype."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner.float()

    def forward(self, x, *args, **kwargs):
        return self.inner(x.float(), *args, **kwargs).to(x.dtype)


class IOCast(nn.Module):
    """Casts floating inputs to ``dtype`` and floating outputs back to float32 (graph I/O stays float32).

    RoPE tables stay float32: the rotation is computed in float32 inside the graph.
    """

    def __init__(self, inner: nn.Module, dtype: torch.dtype, keep_float32: tuple[int, ...] = ()):
        super().__init__()
        self.inner, self.dtype, self.keep = inner, dtype, set(keep_float32)

    def forward(self, *args):
        cast = [a.to(self.dtype) if torch.is_floating_point(a) and i not in self.keep else a for i, a in enumerate(args)]
        return self.inner(*cast).float()


def to_precision(module: nn.Module, precision: str, keep_fp32: Iterable[str] = ()) -> nn.Module:
    """A deep copy of ``module`` in ``precision`` with the named submodules wrapped as fp32 islands."""
    dtype = DTYPES[precision]
    out = copy.deepcopy(module).to(dtype)
    if dtype == torch.float32:
        return out
    for name in keep_fp32:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, Float32Island(getattr(parent, child)))
    return out
