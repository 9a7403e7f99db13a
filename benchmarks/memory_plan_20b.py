"""Memory plan of the real 20B Qwen-Image-Edit config at fp16 and fp8 for a few GPU sizes.

Weights come from the parameter shapes of diffusers' transformer and VAE built on the meta device from the
published configs (no weights, no ONNX): fp16 counts 2 bytes a parameter; fp8 counts 1 byte for the 2-D weights
the calibration quantises (every block Linear; the embedders and output head stay fp16, see
``calibration/layers.py``) plus one fp32 scale per output channel. With a lean export's artifact, run
``uniref-deploy build ART --dry-run --gpu-memory G --precision fp16,fp8`` instead: it reads the ONNX initializers.

    python benchmarks/memory_plan_20b.py [--gib 24,48,80,141] [--untiled]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

from uniref_deploy.calibration.layers import HIGH_PRECISION
from uniref_deploy.engines.memory import GIB, MemoryPlan, WeightStats, engine_memory, format_memory
from uniref_deploy.engines.plan import make_plan
from uniref_deploy.runtime.graphs import DIT, VAE_DECODER, VAE_ENCODER, graph_io
from uniref_deploy.runtime.manifest import GraphSpec, Manifest, ModelConfig
from uniref_deploy.runtime.tiling import TILING_KEY, VaeTiling

CONFIGS = "/work/shared/real-configs/qwen-image-edit.json"


def _meta(cls, cfg: dict):
    with torch.device("meta"):
        return cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})


def dit_weights(model, precision: str) -> WeightStats:
    keep = tuple(k.removeprefix("transformer.") for k in HIGH_PRECISION["qwen-image"])
    sizes = []
    for name, p in model.named_parameters():
        n = p.numel()
        quantised = precision == "fp8" and p.dim() == 2 and not name.startswith(keep)
        sizes.append(n + 4 * p.shape[0] if quantised else 2 * n)
    return WeightStats(sum(sizes), max(sizes))


def vae_weights(model, part: str) -> WeightStats:
    sub = model.encoder if part == VAE_ENCODER else model.decoder
    sizes = [2 * p.numel() for p in sub.parameters()]
    channels = (sub.conv_in.weight.shape[0], sub.conv_out.weight.shape[1])
    return WeightStats(sum(sizes), max(sizes), (int(channels[0]), int(channels[1])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", default="24,48,80,141")
    ap.add_argument("--untiled", action="store_true", help="plan the VAE untiled (export default: tiled)")
    args = ap.parse_args()
    real = json.loads(Path(CONFIGS).read_text())
    t_cfg, v_cfg = real["transformer"]["Qwen-Image-Edit-2509"], real["vae"]
    dit, vae = _meta(QwenImageTransformer2DModel, t_cfg), _meta(AutoencoderKLQwenImage, v_cfg)
    model = ModelConfig("qwen-image", {k: v for k, v in t_cfg.items() if not k.startswith("_")},
                        {k: v_cfg[k] for k in ("z_dim", "latents_mean", "latents_std", "temperal_downsample")}, {})
    if not args.untiled:
        model = dataclasses.replace(model, vae={**model.vae, TILING_KEY: VaeTiling().to_dict()})
    specs = []
    for name, precision in ((DIT, "fp16"), (DIT, "fp8"), (VAE_ENCODER, "fp16"), (VAE_DECODER, "fp16")):
        inputs, outputs = graph_io(name, model)
        sha = hashlib.sha256(f"{name}.{precision}".encode()).hexdigest()
        specs.append(GraphSpec(name, precision, f"onnx/{name}.{precision}.onnx", sha, inputs, outputs))
    manifest = Manifest(model, budgets=(1024**2, 1536**2, 2048**2), graphs=tuple(specs))
    plan = make_plan(manifest, (1024, 1536, 2048), ("fp16", "fp8"))
    stats = {"dit.fp16": dit_weights(dit, "fp16"), "dit.fp8": dit_weights(dit, "fp8"),
             "vae_encoder.fp16": vae_weights(vae, VAE_ENCODER), "vae_decoder.fp16": vae_weights(vae, VAE_DECODER)}
    print(f"DiT parameters: {sum(p.numel() for p in dit.parameters()) / 1e9:.2f} B")
    for gib in (float(g) for g in args.gib.split(",")):
        gpu = int(gib * GIB)
        mem = MemoryPlan(gpu, GIB, tuple(engine_memory(e, model, stats[e.name], gpu) for e in plan.engines))
        print()
        print(format_memory(mem))


if __name__ == "__main__":
    main()
