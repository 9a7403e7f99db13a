"""Peer benchmark: the uniref runtime on ONNX Runtime vs diffusers' ``QwenImageEditPlusPipeline`` (torch fp32, CPU).

Usage::

    python benchmarks/bench_peer.py --model small --art /tmp/small_art --steps 4 --runs 2 --out /tmp/bench_peer

Both pipelines get the same references (fresh procedural images per run, so neither our VAE/text caches nor
anything else is hit), prompt, initial latents, steps and an explicit width/height. Ours runs the ``per-image``
policy at ``--budget`` pixels per reference; diffusers' module constants ``VAE_IMAGE_SIZE`` and
``CONDITION_IMAGE_SIZE`` are monkeypatched to that budget and to our condition area, so both process the same
token counts. No CFG (no negative prompt). The ratio is ours / diffusers on the median end-to-end seconds.

DiT FLOPs per step (analytic, documented): for every ``nn.Linear`` of the transformer that acts per token,
``2 * in * out * tokens`` with tokens = S_img for the image stream (img_in, attn.to_q/k/v/out, img_mlp, norm_out /
proj_out) and S_txt for the text stream (txt_in, attn.add_q/k/v_proj, to_add_out, txt_mlp); the per-sample
modulation linears (img_mod, txt_mod, time embedding) are excluded (negligible, batch 1). Plus joint attention per
block: ``4 * S^2 * inner_dim`` with S = S_img + S_txt (QK^T and AV, 2 FLOPs per MAC each). Achieved FLOP/s =
FLOPs / median DiT-step seconds; peak = best of 3 fp32 numpy matmuls 4096x4096 (2*4096^3 FLOPs) in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "Put the object from picture 1 into a sunny garden, keep its colours."


def matmul_peak(n: int = 4096, reps: int = 3) -> float:
    """Best fp32 numpy matmul GFLOP/s on this machine."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b  # warm up BLAS threads
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def dit_flops(model_dir: Path, s_img: int, s_txt: int) -> dict:
    """Analytic FLOPs of one DiT forward (see module docstring)."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel.from_pretrained(model_dir / "transformer", torch_dtype=torch.float32)
    img_params = txt_params = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or any(k in name for k in ("_mod", "time_text_embed", "norm_out")):
            continue
        macs = mod.in_features * mod.out_features
        if name.startswith("txt_in") or any(k in name for k in ("add_q", "add_k", "add_v", "to_add_out", "txt_mlp")):
            txt_params += macs
        else:
            img_params += macs
    cfg = model.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    s = s_img + s_txt
    linear = 2 * (img_params * s_img + txt_params * s_txt)
    attention = cfg.num_layers * 4 * s * s * inner
    del model
    return {"linear_flops": linear, "attention_flops": attention, "total_flops": linear + attention,
            "img_linear_macs_per_token": img_params, "txt_linear_macs_per_token": txt_params,
            "s_img": s_img, "s_txt": s_txt}


def run_ours(art: Path, images_for, steps: int, runs: int, budget: int, cond_area: int, width: int, height: int,
             latents_for, optimization: str = "all"):
    from uniref_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline.from_artifacts(art, backend="ort", condition_image_area=cond_area, optimization=optimization)
    for b in pipe.backends.values():
        b.activate()
    times, records = [], []
    for i in range(runs + 1):  # run 0 warms up (text encoder load, first-call allocations)
        t0 = time.perf_counter()
        pipe(PROMPT, image=images_for(i), num_inference_steps=1 if i == 0 else steps, budget=budget,
             policy="per-image", width=width, height=height, latents=latents_for(pipe), output_type="np")
        if i:
            times.append(time.perf_counter() - t0)
            records.append(pipe.last_times)
    layout = pipe.last_layout
    s_txt = pipe.text_encoder.encode(PROMPT, images_for(runs))[0].shape[1]
    pipe.close()
    return times, records, layout, s_txt


def run_diffusers(model_dir: Path, images_for, steps: int, runs: int, budget: int, cond_area: int, width: int,
                  height: int, latents_np) -> list[float]:
    import torch
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    edit_plus.VAE_IMAGE_SIZE = budget  # same per-reference area as our per-image policy
    edit_plus.CONDITION_IMAGE_SIZE = cond_area
    pipe = QwenImageEditPlusPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        pipe(image=images_for(i), prompt=PROMPT, num_inference_steps=1 if i == 0 else steps, width=width,
             height=height, latents=torch.from_numpy(latents_np.copy()), output_type="np", true_cfg_scale=1.0)
        if i:
            times.append(time.perf_counter() - t0)
    del pipe
    return times


def time_dit_variant(path: Path, feeds: dict, reps: int = 3, optimization: str = "all") -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimization == "all"
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    return min(_timed(lambda: sess.run(None, feeds)) for _ in range(reps))


def time_dit_graphs(art: Path, layout, s_txt: int) -> dict:
    """One DiT call at the benchmark's shapes for the portable fp32 graph and its ``ort`` variant (if exported)."""
    from uniref_deploy.runtime.manifest import ORT_VARIANT, Manifest
    from uniref_deploy.runtime.rope import RopeCache, RopeConfig

    m = Manifest.load(art)
    spec = m.graph("dit", "fp32")
    cfg = m.model.transformer
    rng = np.random.default_rng(0)
    rope = RopeCache(RopeConfig.from_transformer_config(cfg)).tables(layout.grids, s_txt)
    feeds = {"hidden_states": rng.standard_normal((1, layout.num_image_tokens, cfg["in_channels"]), np.float32),
             "encoder_hidden_states": rng.standard_normal((1, s_txt, cfg["joint_attention_dim"]), np.float32),
             "encoder_hidden_states_mask": np.ones((1, s_txt), bool), "timestep": np.full((1,), 0.5, np.float32),
             **rope}
    feeds = {k: v for k, v in feeds.items() if k in {t.name for t in spec.inputs}}
    result = {"portable_s": time_dit_variant(art / spec.file, feeds)}
    if m.has_graph("dit", "fp32", ORT_VARIANT):
        fused = m.graph("dit", "fp32", ORT_VARIANT)
        result.update(ort_fused_s=time_dit_variant(art / fused.file, feeds), fusions=fused.info.get("fusions"))
        result["speedup"] = result["portable_s"] / result["ort_fused_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", help="preset name (small/tiny) or diffusers folder")
    ap.add_argument("--art", default=None, help="artifact folder exported from --model (default /tmp/<model>_art)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--refs", type=int, default=1)
    ap.add_argument("--budget", type=int, default=512 * 512, help="pixels per reference (per-image policy)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--cond-area", type=int, default=384 * 384)
    ap.add_argument("--no-graph-timing", action="store_true",
                    help="skip timing one DiT call of the portable graph vs its ONNX Runtime-fused variant")
    ap.add_argument("--out", default="bench_peer_out")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from uniref_deploy.runtime import latents as lat
    from uniref_deploy.tools import plots
    from uniref_deploy.tools.model_source import resolve_model
    from uniref_deploy.tools.profiling import procedural_images

    model_dir = Path("/tmp/small_model") if args.model == "small" and Path("/tmp/small_model").is_dir() \
        else resolve_model(args.model)[1]
    art = Path(args.art or f"/tmp/{Path(args.model).name}_art")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def images_for(i: int):
        return procedural_images(args.refs, 1000 + i)  # fresh every run: no cache hits anywhere

    cache: dict = {}

    def latents_for(pipe):
        if "z" not in cache:
            z = pipe.config.latent_channels
            cache["z"] = lat.initial_noise(7, z, args.height // 8, args.width // 8)
        return cache["z"]

    print("peak: numpy fp32 matmul 4096^2 ...", flush=True)
    peak = matmul_peak()
    print(f"peak {peak:.1f} GFLOP/s; ours (ORT) ...", flush=True)
    ours, records, layout, s_txt = run_ours(art, images_for, args.steps, args.runs, args.budget, args.cond_area,
                                            args.width, args.height, latents_for)
    print(f"ours {ours}; diffusers ...", flush=True)
    theirs = run_diffusers(model_dir, images_for, args.steps, args.runs, args.budget, args.cond_area, args.width,
                           args.height, cache["z"])
    flops = dit_flops(model_dir, layout.num_image_tokens, s_txt)
    dit_step = statistics.median([d for r in records for d in r.dit])
    achieved = flops["total_flops"] / dit_step / 1e9
    med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)

    # host overhead: measured at --steps, extrapolated to a 28-step edit (fixed part + per-step scheduler part)
    r = records[-1]
    model = r.text_encode + r.vae_encode + sum(r.dit) + r.vae_decode
    host = r.total - model
    per_step_host = r.scheduler / len(r.dit)
    host28 = host + (28 - len(r.dit)) * per_step_host
    total28 = r.total + (28 - len(r.dit)) * (statistics.mean(r.dit) + per_step_host)
    report = {
        "model": str(model_dir), "artifacts": str(art), "steps": args.steps, "runs": args.runs, "refs": args.refs,
        "budget_pixels_per_ref": args.budget, "width": args.width, "height": args.height,
        "image_tokens": layout.num_image_tokens, "text_tokens": s_txt,
        "ours_ort_s": ours, "diffusers_torch_s": theirs, "median_ours_s": med_ours, "median_diffusers_s": med_theirs,
        "ratio": med_ours / med_theirs, "ratio_target": 0.8,
        "dit_step_median_s": dit_step, "dit_flops": flops, "dit_gflops_per_s": achieved,
        "peak_gflops_per_s": peak, "dit_fraction_of_peak": achieved / peak,
        "host_overhead": {"measured_s": host, "measured_pct": 100 * host / r.total, "steps": len(r.dit),
                          "extrapolated_28_steps_pct": 100 * host28 / total28, "target_pct": 2.0},
        "stage_times_last_run": {"text_encode": r.text_encode, "vae_encode": r.vae_encode, "pack_rope": r.pack_rope,
                                 "dit": sum(r.dit), "scheduler": r.scheduler, "vae_decode": r.vae_decode,
                                 "total": r.total},
    }
    if not args.no_graph_timing:
        print("one DiT call: portable graph vs ORT-fused variant ...", flush=True)
        report["dit_graphs"] = time_dit_graphs(art, layout, s_txt)
    (out / "bench_peer.json").write_text(json.dumps(report, indent=2) + "\n")
    plots.bar_chart(out / "bench_peer.png", ["uniref (ORT)", "diffusers (torch)"], [med_ours, med_theirs],
                    "median end-to-end s", f"{Path(args.model).name}: {layout.num_image_tokens} img tokens, {args.steps} steps, "
                    f"ratio {med_ours / med_theirs:.2f}")
    rows = [("median end-to-end, uniref ORT", f"{med_ours:.2f} s"),
            ("median end-to-end, diffusers torch fp32", f"{med_theirs:.2f} s"),
            ("ratio ours/diffusers (target <= 0.8)", f"{med_ours / med_theirs:.3f}"),
            ("DiT step (median)", f"{dit_step:.3f} s"),
            ("DiT GFLOP per step (analytic)", f"{flops['total_flops'] / 1e9:.1f}"),
            ("DiT achieved GFLOP/s", f"{achieved:.1f}"),
            ("CPU peak GFLOP/s (numpy 4096^2 fp32)", f"{peak:.1f}"),
            ("DiT fraction of peak", f"{100 * achieved / peak:.1f}%"),
            (f"host overhead at {len(r.dit)} steps", f"{100 * host / r.total:.2f}%"),
            ("host overhead, 28 steps (extrapolated)", f"{100 * host28 / total28:.2f}%")]
    if "dit_graphs" in report:
        g = report["dit_graphs"]
        rows.append(("DiT call, portable graph", f"{g['portable_s']:.3f} s"))
        if "ort_fused_s" in g:
            rows.append(("DiT call, ORT-fused graph (used above)", f"{g['ort_fused_s']:.3f} s ({g['speedup']:.3f}x)"))
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    print(f"wrote {out / 'bench_peer.json'}, {out / 'bench_peer.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
