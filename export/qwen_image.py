"""Qwen-Image family adapter: the DiT as an exportable module with RoPE tables (and modulate_index) as inputs.

diffusers builds Qwen-Image RoPE from a python list of image shapes with complex numbers, which ONNX cannot hold.
``QwenImageDitForExport`` re-composes ``QwenImageTransformer2DModel``'s own submodules (img_in, txt_norm, txt_in,
time_text_embed, transformer_blocks, norm_out, proj_out) and swaps each block's attention processor for
``RealRopeAttnProcessor``, which rotates q/k with real cos/sin tables:

    before: q_c = view_as_complex(q.reshape(..., -1, 2)) * freqs           (complex, shape-baked reshape)
    after:  (qe, qo) = q.unflatten(-1, (-1, 2)).unbind(-1)
            q' = stack(qe*cos - qo*sin, qe*sin + qo*cos).flatten(-2)        (real, dynamic sequence length)

Everything family-specific (input names, which layers stay high precision) lives here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, H, D] by tables cos/sin [S, D/2] (float32 math)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # B, S, H, D/2, 2
    xe, xo = pairs.unbind(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((xe * c - xo * s, xe * s + xo * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


def key_padding_bias(text_mask: torch.Tensor, image_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [B, 1, 1, S_txt + S_img] from the text key mask [B, S_txt] (image keys all kept).

    Kept keys get 0 (scores unchanged, bit for bit), padded ones the dtype's most negative finite value, which
    softmax turns into an exact 0 weight because every row keeps at least its image keys.
    """
    keep = torch.cat([text_mask.to(torch.bool), text_mask.new_ones((text_mask.shape[0], image_tokens), dtype=torch.bool)], 1)
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class RealRopeAttnProcessor:
    """Joint text+image attention of Qwen-Image with real-valued RoPE tables.

    ``image_rotary_emb`` is ((img_cos, img_sin), (txt_cos, txt_sin)). Mirrors diffusers'
    QwenDoubleStreamAttnProcessor2_0 math (diffusers 0.42.1) with the rotation written for export.

    ``encoder_hidden_states_mask`` arrives here already as the additive key bias of ``key_padding_bias``
    [B, 1, 1, S_txt + S_img] (0 for kept keys, the dtype's minimum for padding), built once per forward: a bool
    mask makes the exporter emit Where + IsNaN over every [B, H, S, S] score tensor (~10% of a CPU step).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        seq_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (-1, head_dim))  # B, S, H, Dh

        img_q, img_k, img_v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        txt_q = heads(attn.add_q_proj(encoder_hidden_states))
        txt_k = heads(attn.add_k_proj(encoder_hidden_states))
        txt_v = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        (img_cos, img_sin), (txt_cos, txt_sin) = image_rotary_emb
        img_q, img_k = rotate(img_q, img_cos, img_sin), rotate(img_k, img_cos, img_sin)
        txt_q, txt_k = rotate(txt_q, txt_cos, txt_sin), rotate(txt_k, txt_cos, txt_sin)

        q = torch.cat([txt_q, img_q], dim=1).transpose(1, 2)  # B, H, S_txt + S_img, Dh
        k = torch.cat([txt_k, img_k], dim=1).transpose(1, 2)
        v = torch.cat([txt_v, img_v], dim=1).transpose(1, 2)
        bias = None if encoder_hidden_states_mask is None else encoder_hidden_states_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        txt_out, img_out = out[:, :seq_txt], out[:, seq_txt:]
        img_out = attn.to_out[0](img_out.contiguous())
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out


class QwenImageDitForExport(nn.Module):
    """``QwenImageTransformer2DModel`` with the graph interface of ``runtime/graphs.dit_io``.

    Args:
        transformer: a loaded diffusers QwenImageTransformer2DModel (its submodules are shared, not copied).
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.zero_cond_t = bool(getattr(transformer.config, "zero_cond_t", False))
        if getattr(transformer.config, "guidance_embeds", False):
            raise NotImplementedError("guidance-distilled Qwen-Image variants are not supported by this adapter")
        for block in transformer.transformer_blocks:
            block.attn.set_processor(RealRopeAttnProcessor())

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_cos, img_sin,
                txt_cos, txt_sin, modulate_index=None):
        tr = self.transformer
        hidden_states = tr.img_in(hidden_states)
        timestep = timestep.to(hidden_states.dtype)
        index = None
        if self.zero_cond_t:
            timestep = torch.cat([timestep, timestep * 0], dim=0)
            index = modulate_index.to(torch.int32)[None].expand(hidden_states.shape[0], -1)
        encoder_hidden_states = tr.txt_in(tr.txt_norm(encoder_hidden_states))
        temb = tr.time_text_embed(timestep, hidden_states)
        rope = ((img_cos, img_sin), (txt_cos, txt_sin))
        mask = key_padding_bias(encoder_hidden_states_mask, hidden_states.shape[1], hidden_states.dtype)
        for block in tr.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=mask,
                temb=temb,
                image_rotary_emb=rope,
                modulate_index=index,
            )
        if self.zero_cond_t:
            temb = temb.chunk(2, dim=0)[0]
        return tr.proj_out(tr.norm_out(hidden_states, temb))


class VaeEncoderForExport(nn.Module):
    """image [B, 3, H, W] in [-1, 1] -> latent distribution mode [B, z, H/8, W/8]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image[:, :, None]).latent_dist.mode()[:, :, 0]


class VaeDecoderForExport(nn.Module):
    """latent [B, z, h, w] (not normalised) -> image [B, 3, 8h, 8w] clamped to [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent[:, :, None], return_dict=False)[0][:, :, 0]
