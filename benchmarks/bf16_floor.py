"""bf16 accuracy floor: OpenVINO bf16 against our fp32, next to diffusers in torch bf16 against torch fp32.

Usage::

    uniref-deploy preset small --out /tmp/small_model
    uniref-deploy export /tmp/small_model --out /tmp/small_art --budgets 1024 --dtypes fp32 --no-text-graphs
    python benchmarks/bf16_floor.py --model /tmp/small_model --art /tmp/small_art --out /tmp/bench_bf16

One ``--steps`` edit (one reference, same prompt embeddings, references and initial noise for every run), five
trajectories: ours on ONNX Runtime fp32 (the reference of ours), OpenVINO bf16 as shipped (with its f32 islands),
OpenVINO bf16 without the islands (what the split buys), and diffusers' transformer in torch fp32 and bf16 (the
peer and its reference). Each low-precision run is compared with its own fp32 run: the final latent's PSNR and
the cosine of every step's velocity (issue 16's floor: ours within 1.5x of torch bf16's error).

Writes ``<name>.json`` and ``<name>.png`` (per-step 1 - cosine) into ``--out``, with the CPU's features.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _reference_image(side: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    grad = np.linspace(0, 255, side, dtype=np.float32)[None, :, None] * np.ones((side, 1, 3), np.float32)
    return Image.fromarray(np.clip(grad + rng.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8))


def _call(config, side: int, steps: int, seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    return dict(prompt_embeds=rng.standard_normal((1, 24, config.text_hidden_size)).astype(np.float32),
                image=[_reference_image(side, 1)], width=side, height=side, seed=seed, num_inference_steps=steps)


def run(art: Path, model_dir: Path, side: int, steps: int, threads: int) -> dict:
    from uniref_deploy.runtime.backends import openvino as ovb
    from uniref_deploy.runtime.backends.openvino_islands import unsplit
    from uniref_deploy.runtime.pipeline import Pipeline
    from uniref_deploy.tools.precision_floor import (
        TrajectoryError,
        floor_holds,
        step_cosines,
        trajectory,
        trajectory_error,
    )

    def ours(backend: str, precision: str | None):
        return Pipeline.from_artifacts(art, backend=backend, precision=precision, threads=threads,
                                       load_text_encoder=False)

    def peer(dtype: str):
        return Pipeline.from_pretrained(model_dir, torch_dtype=dtype, load_text_encoder=False)

    kw = _call(ours("ort", None).config, side, steps)
    runs, seconds = {}, {}
    plans = [("ours_fp32", lambda: ours("ort", None)), ("openvino_bf16", lambda: ours("openvino", "bf16")),
             ("openvino_bf16_no_islands", None), ("torch_fp32", lambda: peer("float32")),
             ("torch_bf16", lambda: peer("bfloat16"))]
    for label, make in plans:
        t0 = time.perf_counter()
        if make is None:  # the shipped backend with the island split switched off
            keep = ovb.split_f32_islands
            ovb.split_f32_islands = unsplit
            try:
                runs[label] = trajectory(ours("openvino", "bf16"), **kw)
            finally:
                ovb.split_f32_islands = keep
        else:
            runs[label] = trajectory(make(), **kw)
        seconds[label] = round(time.perf_counter() - t0, 2)
        print(f"{label}: {seconds[label]} s", flush=True)
    pairs = {"openvino_bf16": "ours_fp32", "openvino_bf16_no_islands": "ours_fp32", "torch_bf16": "torch_fp32"}
    errors = {k: trajectory_error(runs[k], runs[ref]).to_dict() for k, ref in pairs.items()}
    per_step = {k: [1.0 - c for c in step_cosines(runs[k], runs[ref])] for k, ref in pairs.items()}
    verdicts = {}
    for k in ("openvino_bf16", "openvino_bf16_no_islands"):
        verdicts[k] = {c: bool(v) for c, v in floor_holds(TrajectoryError(**errors[k]),
                                                          TrajectoryError(**errors["torch_bf16"]), 1.5).items()}
    peer_mean = errors["torch_bf16"]["velocity_one_minus_cos_mean"]
    ratios = {k: errors[k]["velocity_one_minus_cos_mean"] / peer_mean for k in verdicts}
    return {"errors": errors, "per_step_one_minus_cos": per_step, "floor_1_5x": verdicts,
            "mean_one_minus_cos_ratio_to_torch_bf16": ratios, "seconds": seconds}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, values in report["per_step_one_minus_cos"].items():
        ax.semilogy(range(1, len(values) + 1), values, marker="o", ms=3, label=label)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("1 - cosine of the velocity vs own fp32")
    cpu = report["cpu"]
    ax.set_title(f"bf16 error per step, {report['steps']} steps, {report['side']}² + 1 reference\n"
                 f"{cpu['model']} (amx={cpu['amx']}, native bf16={cpu['native_bf16']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the diffusers folder the artifacts were exported from")
    ap.add_argument("--art", required=True, help="artifact folder with the portable fp32 DiT")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--side", type=int, default=256, help="target and reference side in pixels")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--name", default="bf16_floor", help="stem of the JSON and PNG written into --out")
    ap.add_argument("--out", default="bench_bf16_floor")
    args = ap.parse_args(argv)

    import openvino
    import torch

    from uniref_deploy.runtime.backends.openvino import native_bf16
    from uniref_deploy.runtime.cpu import cpu_features

    if not native_bf16():
        print("this CPU has no native bf16 (AMX / AVX-512 BF16): OpenVINO would run f32; nothing to measure",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"cpu": cpu_features().to_dict(), "threads": args.threads, "steps": args.steps, "side": args.side,
              "versions": {"openvino": openvino.__version__, "torch": torch.__version__}}
    report.update(run(Path(args.art), Path(args.model), args.side, args.steps, args.threads))
    tmp = out / f".{args.name}.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / f"{args.name}.json")
    plot(report, out / f"{args.name}.png")
    print(f"{'run':<28}{'latent PSNR dB':>16}{'worst 1-cos':>14}{'mean 1-cos':>13}{'mean / torch':>14}")
    for k, e in report["errors"].items():
        ratio = report["mean_one_minus_cos_ratio_to_torch_bf16"].get(k, 1.0)
        print(f"{k:<28}{e['latent_psnr_db']:>16.2f}{1 - e['velocity_cosine_min']:>14.3e}"
              f"{e['velocity_one_minus_cos_mean']:>13.3e}{ratio:>14.2f}")
    print("floor (1.5x torch bf16):", json.dumps(report["floor_1_5x"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
