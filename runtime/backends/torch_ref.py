"""The torch reference backend: diffusers' own transformer and VAE behind the common graph interface.

The DiT runs diffusers' ``QwenImageTransformer2DModel.forward`` unchanged except for its RoPE module, which is
swapped for one that returns the host-computed tables (``runtime/rope.py``) as complex frequencies; so the feeds
are exactly those of the exported graph and the attention math stays diffusers'. torch is imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._lazy import require
from ..graphs import DIT, VAE_DECODER, VAE_ENCODER, graph_io
from ..manifest import ModelConfig
from .base import Backend

TORCH_DTYPES = ("float32", "bfloat16", "float16")


def _torch():
    return require("torch", extra="torch")


def _table_rope_module():
    """An nn.Module standing in for ``transformer.pos_embed``: returns the current (img, txt) complex tables."""
    nn = _torch().nn

    class TableRope(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tables = None

        def forward(self, *args, **kwargs):
            return self.tables

    return TableRope()


class TorchDitBackend(Backend):
    """diffusers' transformer fed with the graph's inputs."""

    kind = "torch"

    def __init__(self, config: ModelConfig, model_dir: str | Path, dtype: str = "float32", device: str = "cpu"):
        super().__init__(DIT, *graph_io(DIT, config))
        self.config, self.model_dir, self.dtype, self.device = config, Path(model_dir), dtype, device
        self.model: Any = None  # the diffusers transformer while active

    def _activate(self) -> None:
        torch = _torch()
        diffusers = require("diffusers", extra="torch")
        self.model = diffusers.QwenImageTransformer2DModel.from_pretrained(
            self.model_dir / "transformer", torch_dtype=getattr(torch, self.dtype)
        ).to(self.device).eval()
        self.model.pos_embed = _table_rope_module()

    def _deactivate(self) -> None:
        self.model = None

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = _torch()
        dt = getattr(torch, self.dtype)

        def t(name: str, dtype=dt):
            arr = feeds[name]
            arr = np.array(arr) if not arr.flags.writeable else np.ascontiguousarray(arr)
            return torch.from_numpy(arr).to(self.device, dtype)

        img = torch.complex(t("img_cos", torch.float32), t("img_sin", torch.float32))
        txt = torch.complex(t("txt_cos", torch.float32), t("txt_sin", torch.float32))
        self.model.pos_embed.tables = (img, txt)
        mask = torch.from_numpy(feeds["encoder_hidden_states_mask"]).to(self.device)
        batch, s_img = feeds["hidden_states"].shape[:2]
        # img_shapes only feeds zero_cond_t's modulate_index once RoPE is replaced: keep the target/reference split.
        n_target = int((feeds["modulate_index"] == 0).sum()) if "modulate_index" in feeds else s_img
        shapes = [(1, 1, n_target)] + ([(1, 1, s_img - n_target)] if s_img > n_target else [])
        with torch.inference_mode():
            out = self.model(
                hidden_states=t("hidden_states"),
                encoder_hidden_states=t("encoder_hidden_states"),
                encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                timestep=t("timestep"),
                img_shapes=[shapes] * batch,
                return_dict=False,
            )[0]
        return {"velocity": out.float().cpu().numpy()}


class _TorchVae:
    """Loads the diffusers VAE once and shares it between the encoder and decoder backends."""

    def __init__(self, model_dir: Path, dtype: str, device: str):
        self.model_dir, self.dtype, self.device = model_dir, dtype, device
        self.model: Any = None  # the diffusers VAE while any user is active
        self.users = 0

    def acquire(self):
        if self.model is None:
            torch = _torch()
            diffusers = require("diffusers", extra="torch")
            self.model = diffusers.AutoencoderKLQwenImage.from_pretrained(
                self.model_dir / "vae", torch_dtype=getattr(torch, self.dtype)
            ).to(self.device).eval()
        self.users += 1
        return self.model

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.model, self.users = None, 0


class TorchVaeEncoderBackend(Backend):
    """image [B,3,H,W] -> latent mode [B,z,H/8,W/8] through diffusers' VAE."""

    kind = "torch"

    def __init__(self, config: ModelConfig, vae: _TorchVae):
        super().__init__(VAE_ENCODER, *graph_io(VAE_ENCODER, config))
        self.vae = vae

    def _activate(self) -> None:
        self.vae.acquire()

    def _deactivate(self) -> None:
        self.vae.release()

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = _torch()
        x = torch.from_numpy(feeds["image"]).to(self.vae.device, getattr(torch, self.vae.dtype))
        with torch.inference_mode():
            latent = self.vae.model.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
        return {"latent": latent.float().cpu().numpy()}


class TorchVaeDecoderBackend(Backend):
    """latent [B,z,h,w] -> image [B,3,8h,8w] through diffusers' VAE."""

    kind = "torch"

    def __init__(self, config: ModelConfig, vae: _TorchVae):
        super().__init__(VAE_DECODER, *graph_io(VAE_DECODER, config))
        self.vae = vae

    def _activate(self) -> None:
        self.vae.acquire()

    def _deactivate(self) -> None:
        self.vae.release()

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = _torch()
        z = torch.from_numpy(feeds["latent"]).to(self.vae.device, getattr(torch, self.vae.dtype))
        with torch.inference_mode():
            image = self.vae.model.decode(z[:, :, None], return_dict=False)[0][:, :, 0]
        return {"image": image.float().cpu().numpy()}


class TorchBackendFactory:
    """Builds the three torch backends from a diffusers-format model folder."""

    @staticmethod
    def create(config: ModelConfig, model_dir: str | Path, dtype: str = "float32", device: str = "cpu",
               **_: object) -> dict[str, Backend]:
        if dtype not in TORCH_DTYPES:
            from ..errors import InputError

            raise InputError(f"Unknown torch dtype '{dtype}'.", f"use one of {TORCH_DTYPES}.")
        vae = _TorchVae(Path(model_dir), dtype, device)
        return {
            DIT: TorchDitBackend(config, model_dir, dtype, device),
            VAE_ENCODER: TorchVaeEncoderBackend(config, vae),
            VAE_DECODER: TorchVaeDecoderBackend(config, vae),
        }
