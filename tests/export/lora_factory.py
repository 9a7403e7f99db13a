"""Tiny random LoRAs for a Qwen-Image transformer, written in each key format diffusers converts (test helper)."""

from __future__ import annotations

from pathlib import Path

import torch

# attention of both streams (image: to_q/to_out.0, text: add_k_proj/to_add_out) and both streams' MLPs
TARGETS = ("attn.to_q", "attn.add_k_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
           "txt_mlp.net.2")
FORMATS = ("peft", "kohya", "diffusion_model")


def lora_factors(transformer: torch.nn.Module, rank: int = 4, seed: int = 0, strength: float = 1.0) -> dict:
    """``{module: (A [r, in], B [out, r])}`` for ``TARGETS`` in every block; B·A has about the weights' scale."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    out = {}
    for name in sorted(modules):
        if any(name.endswith(t) for t in TARGETS) and name.startswith("transformer_blocks."):
            w = modules[name].weight
            a = torch.randn(rank, w.shape[1], generator=gen) / w.shape[1] ** 0.5
            b = torch.randn(w.shape[0], rank, generator=gen) * float(w.detach().std()) * strength / rank**0.5
            out[name] = (a, b)
    return out


def write_lora(factors: dict, path: Path, fmt: str, alpha: float = 2.0) -> Path:
    """Save ``factors`` as diffusers/PEFT (``transformer.<m>.lora_A/B``), kohya (``lora_unet_<m_>.lora_down/up``
    + alpha) or ``diffusion_model.<m>.lora_down/up`` + alpha keys; alpha formats pre-scale up by rank/alpha so
    every format encodes the same delta B·A."""
    from safetensors.torch import save_file

    tensors = {}
    for name, (a, b) in factors.items():
        rank = a.shape[0]
        if fmt == "peft":
            tensors[f"transformer.{name}.lora_A.weight"] = a.contiguous()
            tensors[f"transformer.{name}.lora_B.weight"] = b.contiguous()
            continue
        key = f"lora_unet_{name.replace('.', '_')}" if fmt == "kohya" else f"diffusion_model.{name}"
        tensors[f"{key}.lora_down.weight"] = a.contiguous()
        tensors[f"{key}.lora_up.weight"] = (b * rank / alpha).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
