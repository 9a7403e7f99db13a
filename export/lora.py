"""LoRAs for the DiT, read and fused through diffusers' own Qwen-Image LoRA loading.

``LoraSpec.parse("FILE[:SCALE]")`` names one LoRA; ``read_lora`` loads its safetensors file and converts any key
format diffusers knows for Qwen-Image (diffusers/PEFT ``lora_A``/``lora_B``, kohya ``lora_unet_…lora_down/lora_up``
+ ``alpha``, the ``diffusion_model.`` prefix) with ``QwenImagePipeline.lora_state_dict``; ``check_lora`` rejects
LoRAs whose target modules are missing from the model or have other shapes; ``fuse_loras`` loads each LoRA as a
PEFT adapter of the transformer, fuses it at its scale and unloads the adapter (diffusers' ``fuse_lora``).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.fileio import sha256_file

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
PREFIX = "transformer."


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA: a safetensors file and the scale its delta is fused at (1.0 = as trained)."""

    path: Path
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise InputError(f"LoRA scale {self.scale!r} of '{self.path}' is not a finite number.",
                             "give FILE:SCALE with a finite scale such as 0.8.")

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``FILE`` or ``FILE:SCALE``; the file must exist and the scale be a finite number."""
        path, scale = text, 1.0
        if ":" in text and not Path(text).is_file():
            path, _, scale_text = text.rpartition(":")
            try:
                scale = float(scale_text)
            except ValueError as err:
                raise InputError(f"LoRA scale '{scale_text}' in '{text}' is not a number.",
                                 "use --lora FILE or --lora FILE:SCALE, e.g. lightning.safetensors:1.0.") from err
        if not Path(path).is_file():
            raise InputError(f"LoRA file '{path}' does not exist.", "pass the path of a .safetensors LoRA.")
        return cls(Path(path), scale)

    def record(self) -> dict:
        """What the manifest keeps of this LoRA: file name, content hash, scale."""
        return {"file": self.path.name, "sha256": _sha256(str(self.path.resolve()), os.stat(self.path).st_mtime_ns),
                "scale": float(self.scale)}


@functools.lru_cache(maxsize=32)
def _sha256(path: str, mtime_ns: int) -> str:
    return sha256_file(path)


def read_lora(spec: LoraSpec) -> dict:
    """The LoRA's tensors in diffusers' format (``transformer.<module>.lora_A/B.weight``, alphas folded in).

    Raises:
        InputError: the file is not a readable safetensors file or holds no LoRA diffusers can convert.
    """
    from diffusers import QwenImagePipeline
    from safetensors.torch import load_file

    try:
        raw = load_file(str(spec.path))
    except Exception as err:  # safetensors raises its own error types for damaged headers and truncated data
        raise InputError(f"LoRA '{spec.path}' is not a readable safetensors file ({_first_line(err)}).",
                         "re-download it or pass another .safetensors file.") from err
    if not raw:
        raise InputError(f"LoRA '{spec.path}' holds no tensors.", "pass a LoRA .safetensors file.")
    try:
        state = QwenImagePipeline.lora_state_dict(raw)
    except (ValueError, KeyError, IndexError, RuntimeError) as err:
        raise InputError(f"LoRA '{spec.path}' is not in a LoRA key format diffusers converts ({_first_line(err)}).",
                         "expected diffusers/PEFT lora_A/lora_B or kohya lora_unet_ lora_down/lora_up keys.") from err
    bad = [k for k in state if not k.endswith((A_SUFFIX, B_SUFFIX))]
    if bad:
        raise InputError(f"LoRA '{spec.path}' has {len(bad)} key(s) that are not LoRA weights, e.g. {bad[:3]}.",
                         "only plain LoRA (lora_A/lora_B or lora_down/lora_up) files can be fused.")
    return state


def lora_pairs(state: Mapping) -> dict[str, tuple]:
    """``{module name: (A [r, in], B [out, r])}`` from a state dict of ``read_lora``."""
    out = {}
    for key, a in state.items():
        if key.endswith(A_SUFFIX):
            name = key[: -len(A_SUFFIX)].removeprefix(PREFIX)
            out[name] = (a, state[key[: -len(A_SUFFIX)] + B_SUFFIX])
    return out


def fused_weight(weight, deltas: Sequence[tuple]):
    """``weight`` (any float dtype) + Σ scale·(B·A) over ``deltas`` ((A, B, scale) in fusion order), in float32
    torch math as PEFT's merge computes it; a new float32 tensor."""
    import torch

    w = weight.detach().to(torch.float32, copy=True)
    for a, b, scale in deltas:
        w += (b.float() @ a.float()) * scale
    return w


def check_lora(spec: LoraSpec, state: Mapping, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Every target module exists among ``shapes`` (module name -> weight [out, in]) with matching sizes.

    Raises:
        InputError: one line naming a few unmatched modules (a LoRA for another model) or mismatched shapes.
    """
    pairs = lora_pairs(state)
    missing = sorted(n for n in pairs if n not in shapes)
    if missing:
        raise InputError(
            f"LoRA '{spec.path.name}': {len(missing)} of {len(pairs)} target module(s) match no linear layer of this "
            f"model's DiT, e.g. {', '.join(missing[:3])}.", "is it a LoRA for another model? It must target this "
            "Qwen-Image(-Edit) transformer (e.g. transformer_blocks.0.attn.to_q).")
    wrong = [n for n, (a, b) in pairs.items() if (int(b.shape[0]), int(a.shape[1])) != tuple(shapes[n])]
    if wrong:
        n = wrong[0]
        raise InputError(
            f"LoRA '{spec.path.name}': {len(wrong)} module(s) have other sizes than this model's, e.g. {n}: LoRA "
            f"{int(pairs[n][1].shape[0])}x{int(pairs[n][0].shape[1])}, model {shapes[n][0]}x{shapes[n][1]}.",
            "it was trained for another size of the model.")


def linear_shapes(module) -> dict[str, tuple[int, int]]:
    """Module name -> (out_features, in_features) of each ``torch.nn.Linear`` in ``module``."""
    import torch

    return {n: (m.out_features, m.in_features) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def read_checked(specs: Sequence[LoraSpec], shapes: Mapping[str, tuple[int, int]]) -> list[dict]:
    """``read_lora`` + ``check_lora`` of every LoRA, before anything is written (bad input fails early)."""
    states = []
    for spec in specs:
        state = read_lora(spec)
        check_lora(spec, state, shapes)
        states.append(state)
    return states


def fuse_loras(transformer, specs: Sequence[LoraSpec], say: Callable[[str], None] | None = None) -> dict[str, object]:
    """Fuse each LoRA into ``transformer`` (diffusers' ``load_lora_adapter`` + ``fuse_lora`` + ``unload_lora``).

    Returns the un-fused weights of every touched linear layer (module name -> fp32 tensor [out, in]), which the
    artifact keeps so that ``uniref-deploy lora`` can swap LoRAs without the source checkpoint.
    """
    if not specs:
        return {}
    states = read_checked(specs, linear_shapes(transformer))
    modules = dict(transformer.named_modules())
    base = {n: modules[n].weight.detach().float().clone() for s in states for n in lora_pairs(s)}
    for i, (spec, state) in enumerate(zip(specs, states, strict=True)):
        if say:
            say(f"export: fusing LoRA {spec.path.name} at scale {spec.scale:g} ({len(lora_pairs(state))} layers)")
        name = f"uniref_lora_{i}"
        transformer.load_lora_adapter(dict(state), adapter_name=name, prefix="transformer")
        transformer.fuse_lora(lora_scale=spec.scale, adapter_names=[name])
        transformer.unload_lora()
    return base


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


BASE_FILE = "lora/base.safetensors"


def save_lora_base(art: Path, base: Mapping[str, object]) -> None:
    """Keep the un-fused weights of the LoRA-touched layers in ``ART/lora/base.safetensors`` (written atomically);
    without LoRAs the file is removed (every layer of the graphs is then its base)."""
    from safetensors.torch import save_file

    from uniref_deploy.runtime.fileio import atomic_path

    path = Path(art) / BASE_FILE
    if not base:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in base.items()}, str(tmp))


def validate_loras(transformer_config: dict, specs: Sequence[LoraSpec]) -> None:
    """Read and check every LoRA against the transformer's layer shapes (built on the meta device: no weights),
    so that bad input fails before any file is written."""
    if not specs:
        return
    import torch
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        model = QwenImageTransformer2DModel.from_config(transformer_config)
    read_checked(specs, linear_shapes(model))
