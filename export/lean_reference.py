"""A memory-lean fp32 torch reference of a checkpoint's DiT: each layer's weights are read when it runs.

The lean export never holds the DiT in memory, so its graphs cannot be validated against a loaded torch model.
``streamed_dit`` builds ``QwenImageDitForExport`` on the meta device and gives every module that owns parameters
a pair of hooks:

    before its forward: read its tensors from the safetensors shards (by byte range), as float32
    after its forward:  put them back on the meta device (the storage is freed)

Peak memory is the activations plus one layer's fp32 weights (a 3072 x 12288 Linear is 150 MB); every call reads
the checkpoint once more, which is what a few smoke samples can afford.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from uniref_deploy.runtime.manifest import ModelConfig

from .lean import SafetensorsEntry, checkpoint_index, transformer_dir
from .lora import fused_weight
from .qwen_image import QwenImageDitForExport


class _ShardReader:
    """Reads single tensors from the shards by byte range, as float32 (no memory map stays behind: a mapped 40 GB
    checkpoint would count as this process's memory)."""

    def __init__(self, index: dict[str, SafetensorsEntry], deltas: Mapping[str, list] | None = None):
        self.index = index
        self.deltas = deltas or {}

    def tensor(self, key: str) -> torch.Tensor:
        entry = self.index[key]
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            raw = bytearray(f.read(entry.nbytes))
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[entry.dtype]
        weight = torch.frombuffer(raw, dtype=dtype).reshape(entry.shape)
        return fused_weight(weight, self.deltas[key]) if key in self.deltas else weight.float()


def streamed_dit(model_dir: str | os.PathLike, config: ModelConfig, deltas: Mapping[str, list] | None = None) -> nn.Module:
    """``QwenImageDitForExport`` of ``model_dir``'s checkpoint with weights read per layer call (fp32 math); a
    weight whose key is in ``deltas`` (export/lean_lora.py) is read LoRA-fused.

    Raises:
        ExportError: the folder has no safetensors weights (from ``checkpoint_index``).
    """
    import diffusers

    tdir = transformer_dir(Path(model_dir))
    reader = _ShardReader(checkpoint_index(tdir), deltas or {})
    transformer_config = {k: v for k, v in config.transformer.items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer = diffusers.QwenImageTransformer2DModel.from_config(transformer_config)
    transformer = transformer.float().eval()
    for prefix, module in transformer.named_modules():
        own = [name for name, _ in module.named_parameters(recurse=False)]
        if own:
            module.register_forward_pre_hook(_loader(reader, prefix, own))
            module.register_forward_hook(_unloader(own))
    return QwenImageDitForExport(transformer).eval()


def _loader(reader: _ShardReader, prefix: str, names: list[str]):
    def load(module: nn.Module, _args) -> None:
        for name in names:
            key = f"{prefix}.{name}" if prefix else name
            module._parameters[name] = nn.Parameter(reader.tensor(key), requires_grad=False)
    return load


def _unloader(names: list[str]):
    def unload(module: nn.Module, _args, _out) -> None:
        for name in names:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(torch.empty(p.shape, device="meta"), requires_grad=False)
    return unload
