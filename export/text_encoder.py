"""Qwen2.5-VL as two exportable graphs: the vision tower (``text_vision``) and the language model (``text_encoder``).

The wrappers reuse transformers' own submodules (patch embedding, RMSNorms, MLPs, projections, merger) and replace
only what depends on positions or variable-length packing, which the host now feeds (``TEXT_CONTRACT.md``):

    transformers:  grid_thw -> window index, cu_seqlens, rotary tables (Python loops)  -> blocks (split per window)
    here:          host: window_index, vision_cos/sin, window_mask/full_mask            -> blocks (one masked matmul)

Attention is written out (scores, additive mask, softmax, values) with the rotation and the softmax in float32 at
every precision; an fp16 graph also keeps its RMSNorms in float32 (``fp16_text_islands``), as transformers does.
The token-embedding lookup runs on the host (a stored table): see ``export/text_files.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from uniref_deploy.runtime.encoder_io import MASK_MIN


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in float32, returned in ``x``'s dtype."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for [1, H, S, d] tensors; scores masked and normalised in float32."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2)).float() + mask
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(weights, v)


class VisionTowerForExport(nn.Module):
    """``text_vision``: (pixel_patches, window_index, vision_cos, vision_sin, window_mask, full_mask) -> image_embeds.

    Equal to transformers' ``Qwen2_5_VisionTransformerPretrainedModel(...).pooler_output`` for the same images.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.patch_embed, self.blocks, self.merger = visual.patch_embed, visual.blocks, visual.merger
        self.full = frozenset(int(i) for i in visual.config.fullatt_block_indexes)
        self.unit = int(visual.config.spatial_merge_size) ** 2
        self.heads = int(visual.config.num_heads)

    def forward(self, pixel_patches: torch.Tensor, window_index: torch.Tensor, vision_cos: torch.Tensor,
                vision_sin: torch.Tensor, window_mask: torch.Tensor, full_mask: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_patches)
        n, dim = x.shape
        x = x.reshape(-1, self.unit, dim)[window_index].reshape(n, dim)  # window order, in merge units
        cos, sin = vision_cos[None, None], vision_sin[None, None]
        for i, block in enumerate(self.blocks):
            mask = full_mask if i in self.full else window_mask
            x = x + self._attention(block.attn, block.norm1(x), cos, sin, mask)
            x = x + block.mlp(block.norm2(x))
        merged = self.merger(x)
        return torch.zeros_like(merged).index_copy(0, window_index, merged)  # back to the processor's order

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos, sin, mask) -> torch.Tensor:
        n = x.shape[0]
        qkv = attn.qkv(x).reshape(n, 3, self.heads, -1).permute(1, 2, 0, 3)  # [3, H, N, d]
        q, k, v = (t[None] for t in qkv.unbind(0))
        out = _attend(_rotate(q, cos, sin), _rotate(k, cos, sin), v, mask, attn.scaling)
        return attn.proj(out[0].transpose(0, 1).reshape(n, -1))


class LanguageModelForExport(nn.Module):
    """``text_encoder``: (inputs_embeds, rope_cos, rope_sin, attention_mask) -> last_hidden_state (after the norm).

    Equal to ``Qwen2_5_VLForConditionalGeneration(..., output_hidden_states=True).hidden_states[-1]`` given the
    same embeddings and positions.
    """

    def __init__(self, language_model: nn.Module):
        super().__init__()
        self.layers, self.norm = language_model.layers, language_model.norm
        cfg = language_model.config
        self.heads, self.kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)

    def forward(self, inputs_embeds: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        x = inputs_embeds
        cos, sin = rope_cos[:, None], rope_sin[:, None]
        for layer in self.layers:
            x = x + self._attention(layer.self_attn, layer.input_layernorm(x), cos, sin, attention_mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos, sin, mask) -> torch.Tensor:
        b, length, _ = x.shape
        q = attn.q_proj(x).view(b, length, self.heads, -1).transpose(1, 2)
        k = attn.k_proj(x).view(b, length, self.kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).view(b, length, self.kv_heads, -1).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        groups = self.heads // self.kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = _attend(q, k, v, mask, attn.scaling)
        return attn.o_proj(out.transpose(1, 2).reshape(b, length, -1))


def load_text_encoder(text_encoder_dir, device: str | None = None) -> nn.Module:
    """transformers' ``Qwen2_5_VLForConditionalGeneration`` in float32 (eager attention), eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    kwargs = {"device_map": device} if device else {}
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        text_encoder_dir, dtype=torch.float32, attn_implementation="eager", **kwargs).eval()


def text_modules(model: nn.Module) -> tuple[VisionTowerForExport, LanguageModelForExport]:
    """The two exportable wrappers around a loaded (or meta) ``Qwen2_5_VLForConditionalGeneration``."""
    inner = model.model
    return VisionTowerForExport(inner.visual).eval(), LanguageModelForExport(inner.language_model).eval()


def fp16_text_islands(module: nn.Module) -> list[str]:
    """Submodules that stay float32 in an fp16 text graph: every RMSNorm (transformers computes them in float32)."""
    return sorted(name for name, mod in module.named_modules() if type(mod).__name__.endswith("RMSNorm"))


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """[S, S] bool (True: may attend) -> [1, 1, S, S] float32 additive mask (0 / ``MASK_MIN``)."""
    return torch.where(allowed, 0.0, MASK_MIN).to(torch.float32)[None, None]
