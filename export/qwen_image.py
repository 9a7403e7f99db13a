"""Qwen-Image family adapter: the DiT as an exportable module with RoPE tables (and modulate_index) as inputs.

diffusers builds Qwen-Image RoPE from a python list of image shapes with complex numbers, which ONNX cannot hold.
``QwenImageDitForExport`` re-composes ``QwenImageTransformer2DModel``'s own submodules (img_in, txt_norm, txt_in,
time_text_embed, transformer_blocks, norm_out, proj_out) and swaps each block's attention processor for
``RealRopeAttnProcessor``, which rotates q/k with real cos/sin tables:

    before: q_c = view_as_complex(q.reshape(..., -1, 2)) * freqs           (complex, shape-baked reshape)
    after:  (qe, qo) = q.unflatten(-1, (-1, 2)).unbind(-1)
            q' = stack(qe*cos - qo*sin, qe*sin + qo*cos).flatten(-2)        (real, dynamic sequence length)

Edit-2511's ``zero_cond_t`` (reference tokens modulated with the embedding of t = 0) runs through
``zero_cond_block``, which keeps the two timestep embeddings on their own axis ``[2, B, D]`` so batch stays
dynamic.

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
        encoder_hidden_states = tr.txt_in(tr.txt_norm(encoder_hidden_states))
        temb = tr.time_text_embed(timestep, hidden_states)  # B, D
        if self.zero_cond_t:  # the t and zero-t embeddings on their own leading axis: 2, B, D
            temb = torch.stack([temb, tr.time_text_embed(timestep * 0, hidden_states)])
        rope = ((img_cos, img_sin), (txt_cos, txt_sin))
        mask = key_padding_bias(encoder_hidden_states_mask, hidden_states.shape[1], hidden_states.dtype)
        for block in tr.transformer_blocks:
            if self.zero_cond_t:
                encoder_hidden_states, hidden_states = zero_cond_block(
                    block, hidden_states, encoder_hidden_states, mask, temb, rope, modulate_index)
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    encoder_hidden_states_mask=mask,
                    temb=temb,
                    image_rotary_emb=rope,
                )
        return tr.proj_out(tr.norm_out(hidden_states, temb[0] if self.zero_cond_t else temb))


def select_modulation(params: torch.Tensor, modulate_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-token (shift, scale, gate) [B, S, D] from the paired modulation ``params`` [2, B, 3D].

    ``params[0]`` comes from the timestep's embedding, ``params[1]`` from the zero timestep's; token ``i`` takes
    the first where ``modulate_index[i] == 0`` (target) and the second elsewhere (references). The pair keeps its
    own axis, so the batch axis is never split in half (which would pin batch to an even size in the graph).
    """
    first = (modulate_index == 0)[None, :, None]  # 1, S, 1
    return tuple(torch.where(first, p[0][:, None], p[1][:, None]) for p in params.chunk(3, dim=-1))


def zero_cond_block(block: nn.Module, img: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor | None,
                    temb: torch.Tensor, rope: tuple, modulate_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``QwenImageTransformerBlock`` of a ``zero_cond_t`` model with ``temb`` as [2, B, D] (t, zero t).

    The same arithmetic as the block's own forward (diffusers 0.42.1), with the image stream's modulation chosen
    per token by ``select_modulation``; the text stream is modulated by the timestep's embedding only.
    Returns (text, image) like the block.
    """
    img_params = block.img_mod(temb)  # 2, B, 6D
    txt_params = block.txt_mod(temb[0])  # B, 6D
    img_first, img_second = img_params.chunk(2, dim=-1)
    txt_first, txt_second = (p.chunk(3, dim=-1) for p in txt_params.chunk(2, dim=-1))

    shift, scale, gate_img = select_modulation(img_first, modulate_index)
    t_shift, t_scale, gate_txt = (p[:, None] for p in txt_first)
    attn_img, attn_txt = block.attn(
        hidden_states=block.img_norm1(img) * (1 + scale) + shift,
        encoder_hidden_states=block.txt_norm1(txt) * (1 + t_scale) + t_shift,
        encoder_hidden_states_mask=mask,
        image_rotary_emb=rope,
    )
    img = img + gate_img * attn_img
    txt = txt + gate_txt * attn_txt

    shift, scale, gate_img = select_modulation(img_second, modulate_index)
    img = img + gate_img * block.img_mlp(block.img_norm2(img) * (1 + scale) + shift)
    t_shift, t_scale, gate_txt = (p[:, None] for p in txt_second)
    txt = txt + gate_txt * block.txt_mlp(block.txt_norm2(txt) * (1 + t_scale) + t_shift)
    if txt.dtype == torch.float16:  # as the block: keep fp16 activations finite
        txt = txt.clip(-65504, 65504)
    if img.dtype == torch.float16:
        img = img.clip(-65504, 65504)
    return txt, img


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
