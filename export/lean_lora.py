"""LoRAs in the memory-lean export: each targeted weight is fused while it is streamed from the checkpoint.

``streamed_deltas`` reads every LoRA once, up front, through diffusers' key conversion (``read_checked`` of
export/lora.py, checked against the linear layers of a meta-device transformer) and returns
``{checkpoint key: [(A, B, scale), ...]}``. ``fuse_bytes`` then turns one streamed weight into its fused bytes:

    checkpoint bytes ──► float32 W ──► W + Σ scale·(B·A)  (float32, LoRAs in order) ──► graph dtype bytes

Only one weight is ever widened to float32 at a time, so the export's peak memory grows by one layer plus the
LoRA factors themselves (rank × (in + out) per layer), never by the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch

from .lora import LoraSpec, fused_weight, linear_shapes, lora_pairs, read_checked

Deltas = dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
ONNX_TORCH = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
              onnx.TensorProto.BFLOAT16: torch.bfloat16}


def meta_linear_shapes(transformer_config: dict) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) of every linear layer of the transformer, built on the meta device (no weights)."""
    import diffusers

    with torch.device("meta"):
        model = diffusers.QwenImageTransformer2DModel.from_config(dict(transformer_config))
    return linear_shapes(model)


def streamed_deltas(transformer_config: dict, specs: Sequence[LoraSpec]) -> Deltas:
    """``{checkpoint weight key: [(A, B, scale), ...]}`` of every LoRA, in the order they are fused.

    Raises:
        InputError: a LoRA is unreadable, targets modules this transformer does not have, or has other sizes.
    """
    if not specs:
        return {}
    states = read_checked(specs, meta_linear_shapes(transformer_config))
    out: Deltas = {}
    for spec, state in zip(specs, states, strict=True):
        for module, (a, b) in lora_pairs(state).items():
            out.setdefault(f"{module}.weight", []).append((a, b, float(spec.scale)))
    return out


def fuse_bytes(raw: bytes | bytearray, src: str, shape: tuple[int, ...], dst: int,
               deltas: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> memoryview:
    """The bytes of one fused weight: ``raw`` (safetensors dtype ``src``) + its deltas, cast to ONNX type ``dst``."""
    weight = torch.frombuffer(raw if isinstance(raw, bytearray) else bytearray(raw), dtype=TORCH_DTYPES[src])
    fused = fused_weight(weight.reshape(shape), deltas).to(ONNX_TORCH[dst]).contiguous()
    return memoryview(fused.reshape(-1).view(torch.uint8).numpy())


def module_index(plan_keys: Mapping[str, str], shapes: Mapping[str, tuple[int, int]]) -> dict[str, list]:
    """``lora/index.json`` entries of a lean graph: module -> [initializer, transposed (never), [out, in]].

    ``plan_keys`` maps initializer names to checkpoint keys; a linear layer without an initializer (pruned from the
    graph) is listed with ``None``, as export/lora_swap.py's content index does.
    """
    by_key = {k: name for name, k in plan_keys.items()}
    return {m: [by_key.get(f"{m}.weight"), False, list(s)] for m, s in shapes.items()}


LEAN_SOURCE_FILE = "lora/source.json"


def write_lean_lora_index(art: Path, transformer_config: dict, graph_keys: Mapping[str, Mapping[str, str]],
                          checkpoint: Path, deltas: Mapping[str, list], consumed: bool) -> None:
    """``lora/index.json`` of lean DiT graphs (by parameter identity, no content search) and ``lora/source.json``:
    where a swap reads the base weights (the checkpoint, unless its shards were consumed) and which layers hold a
    fused LoRA now."""
    from uniref_deploy.runtime.fileio import atomic_write_text

    shapes = meta_linear_shapes(transformer_config)
    index = {rel: module_index(keys, shapes) for rel, keys in sorted(graph_keys.items(), key=lambda kv: kv[0])}
    atomic_write_text(art / "lora" / "index.json", json.dumps(index, indent=1))
    fused = sorted(k.removesuffix(".weight") for k in deltas)
    write_lean_source(art, {"checkpoint": str(Path(checkpoint).resolve()), "consumed": bool(consumed),
                            "shards": {} if consumed else shard_fingerprint(checkpoint), "fused": fused})


def write_lean_source(art: Path, source: Mapping) -> None:
    from uniref_deploy.runtime.fileio import atomic_write_text

    atomic_write_text(Path(art) / LEAN_SOURCE_FILE, json.dumps(dict(source), indent=1))


def shard_fingerprint(checkpoint: Path) -> dict[str, list[int]]:
    """{shard name: [size, mtime_ns]} of a transformer folder's safetensors files: a swap reads base weights from
    them only when they are the files the export streamed."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(checkpoint).glob("*.safetensors"))}
