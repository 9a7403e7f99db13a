"""CPU fast path benchmark: one DiT step and a 28-step edit on ONNX Runtime, OpenVINO and diffusers in torch.

Usage::

    uniref-deploy preset small --out /tmp/small_model
    uniref-deploy export /tmp/small_model --out /tmp/small_art --budgets 1024 --dtypes fp32
    python benchmarks/openvino_cpu.py --model /tmp/small_model --art /tmp/small_art --out /tmp/bench_ov

Part 1, one DiT call at each ``--tokens`` image-token count (target and one reference of equal square grids)
plus ``--text-tokens`` text tokens, the same feeds for every backend: ORT fp32 (portable ``dit.onnx`` and the
ORT-fused ``dit.ort.onnx``), OpenVINO f32 and bf16 (inference-precision hint on ``dit.onnx``), the INT8 graphs of
``calibrate --precision int8`` on ORT and OpenVINO (when the artifacts have them), and the diffusers transformer
in torch fp32 and bf16 (``--dit-backends`` picks rows). One warm-up call, then ``--runs`` timed calls; medians. Each output's error
against ORT fp32 is recorded too.

Part 2, a ``--steps`` edit end to end (1 reference 256², target 256², no CFG, same prompt, references and initial
latents): ours on ORT (fused DiT) and on OpenVINO (measured per-graph precision, and f32), against diffusers'
``QwenImageEditPlusPipeline`` in torch fp32 and bf16. Ratios are ours / diffusers within this one run, because
the machine may be shared: the load average is recorded before and after.

Writes ``openvino_cpu.json`` and ``openvino_cpu.png`` into ``--out``, with the CPU's features (AMX, AVX-512 BF16,
VNNI) and the library versions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "Turn the picture into a watercolor painting with soft edges."
E2E_SIDE = 256


def _median_call(fn, runs: int) -> tuple[float, list[float], object]:
    out = fn()  # warm-up (first-shape allocations, kernel selection)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def dit_feeds(config, tokens: int, text_tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds of one DiT call: target and one reference on equal square token grids, ``tokens`` in total."""
    from uniref_deploy.runtime.rope import RopeCache, RopeConfig, modulation_index

    side = int(round((tokens / 2) ** 0.5))
    if 2 * side * side != tokens:
        raise SystemExit(f"--tokens {tokens}: use 2*n*n (e.g. 512, 3200)")
    grids = [(side, side), (side, side)]
    rng = np.random.default_rng(seed)
    feeds = {
        "hidden_states": rng.standard_normal((1, tokens, 4 * config.latent_channels)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((1, text_tokens, config.text_hidden_size)).astype(np.float32),
        "encoder_hidden_states_mask": np.ones((1, text_tokens), dtype=bool),
        "timestep": np.full((1,), 0.6, np.float32),
        **RopeCache(RopeConfig.from_transformer_config(config.transformer)).tables(grids, text_tokens),
    }
    if config.zero_cond_t:
        feeds["modulate_index"] = modulation_index(grids)
    return feeds


def dit_backends(art: Path, model_dir: Path, threads: int, int8_arts: tuple[Path, ...] = ()) -> dict:
    """label -> zero-argument constructor of a DiT backend (built one at a time to bound memory)."""
    from uniref_deploy.runtime.backends.openvino import OpenVinoBackend
    from uniref_deploy.runtime.backends.ort import OrtBackend
    from uniref_deploy.runtime.backends.torch_ref import TorchDitBackend
    from uniref_deploy.runtime.manifest import ORT_VARIANT, Manifest

    m = Manifest.load(art)
    portable = m.graph("dit", "fp32")
    made = {
        "ort_fp32": lambda: OrtBackend(portable, art, threads=threads, verify=False),
        "openvino_f32": lambda: OpenVinoBackend(portable, art, "fp32", threads=threads, cache_dir=art / "cache/openvino"),
        "openvino_bf16": lambda: OpenVinoBackend(portable, art, "bf16", threads=threads, cache_dir=art / "cache/openvino"),
        "torch_fp32": lambda: TorchDitBackend(m.model, model_dir, "float32"),
        "torch_bf16": lambda: TorchDitBackend(m.model, model_dir, "bfloat16"),
    }
    if m.has_graph("dit", "fp32", ORT_VARIANT):
        made["ort_fp32_fused"] = lambda: OrtBackend(m.graph("dit", "fp32", ORT_VARIANT), art, threads=threads,
                                                    verify=False)
    # INT8 graphs from `calibrate --precision int8` (the chosen one and the static Q/DQ one kept beside it);
    # OpenVINO runs their non-quantised ops at the CPU's best precision, as the backend factory does
    from uniref_deploy.runtime.backends.openvino import native_bf16

    hint = "bf16" if native_bf16() else "fp32"
    for root in (art, *int8_arts):  # --int8-art: copies calibrated with other --activations choices
        for g in (g for g in Manifest.load(root).graphs if g.name == "dit" and g.precision == "int8"):
            mode = g.info.get("candidate", g.variant or "int8").replace("+", "_")
            made[f"ort_int8_{mode}"] = lambda g=g, r=root: OrtBackend(g, r, threads=threads, verify=False)
            made[f"openvino_int8_{mode}"] = lambda g=g, r=root: OpenVinoBackend(g, r, hint, threads=threads,
                                                                                cache_dir=r / "cache/openvino")
    return made


def bench_dit(art: Path, model_dir: Path, tokens: list[int], text_tokens: int, runs: int, threads: int,
              only: list[str] | None = None, int8_arts: tuple[Path, ...] = ()) -> dict:
    from uniref_deploy.runtime.compare import compare
    from uniref_deploy.runtime.manifest import Manifest

    config = Manifest.load(art).model
    feeds = {n: dit_feeds(config, n, text_tokens) for n in tokens}
    results: dict = {}
    reference: dict[int, np.ndarray] = {}
    for label, make in dit_backends(art, model_dir, threads, int8_arts).items():
        if only and label not in only and label != "ort_fp32":  # ORT fp32 is every row's error reference
            continue
        backend = make()
        t0 = time.perf_counter()
        backend.activate()
        load_s = time.perf_counter() - t0
        for n in tokens:
            med, times, out = _median_call(lambda n=n, b=backend: b.infer(feeds[n])["velocity"], runs)
            row = {"median_s": med, "times_s": times, "load_s": load_s}
            if label == "ort_fp32":
                reference[n] = out
            else:
                err = compare(label, out, reference[n])
                row.update(rel_max_vs_ort_fp32=err.rel_max, cosine_vs_ort_fp32=err.cosine)
            results.setdefault(str(n), {})[label] = row
            print(f"  dit {label:<15} {n}+{text_tokens} tokens: {med:.3f} s", flush=True)
        backend.deactivate()
        del backend  # noqa: F821 - free the model before the next one loads
        gc.collect()
    return results


def bench_start(art: Path, threads: int) -> dict:
    """Seconds from ``from_artifacts`` to every graph compiled: first start ever (per-graph precision measured,
    empty model cache), a start with the precision recorded but no cache, and a start with both."""
    import dataclasses
    import shutil

    from uniref_deploy.runtime.backends.openvino import CACHE_DIR
    from uniref_deploy.runtime.backends.openvino_precision import STAGE
    from uniref_deploy.runtime.manifest import Manifest
    from uniref_deploy.runtime.pipeline import Pipeline

    m = Manifest.load(art)
    dataclasses.replace(m, stages=tuple(s for s in m.stages if s.stage != STAGE)).save(art)
    rows = {}
    for label, clear_cache in (("first_start_s", True), ("recorded_no_cache_s", True), ("cached_s", False)):
        if clear_cache:
            shutil.rmtree(art / CACHE_DIR, ignore_errors=True)
        t0 = time.perf_counter()
        pipe = Pipeline.from_artifacts(art, backend="openvino", threads=threads, load_text_encoder=False)
        for b in pipe.backends.values():
            b.activate()
        rows[label] = time.perf_counter() - t0
        pipe.close()
        print(f"  openvino start {label}: {rows[label]:.2f} s", flush=True)
    rows["precisions"] = Manifest.load(art).stage(STAGE).results["graphs"]
    return rows


def run_ours(art: Path, backend: str, precision: str | None, steps: int, runs: int, latents, images_for,
             threads: int) -> dict:
    from uniref_deploy.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.from_artifacts(art, backend=backend, precision=precision, threads=threads)
    pipe.budgets = None  # per-image at a test budget: dynamic axes take any size
    for b in pipe.backends.values():
        b.activate()
    load_s = time.perf_counter() - t0
    times = []
    for i in range(runs + 1):  # run 0 warms up the text encoder and first-call allocations
        t0 = time.perf_counter()
        pipe(PROMPT, image=images_for(i), num_inference_steps=1 if i == 0 else steps, budget=E2E_SIDE ** 2,
             policy="per-image", width=E2E_SIDE, height=E2E_SIDE, latents=latents, output_type="np")
        if i:
            times.append(time.perf_counter() - t0)
    layout = pipe.last_layout
    used = {n: getattr(b, "inference_precision", precision or "fp32") for n, b in pipe.backends.items()}
    pipe.close()
    return {"median_s": statistics.median(times), "times_s": times, "load_s": load_s, "precisions": used,
            "image_tokens": layout.num_image_tokens}


def run_diffusers(model_dir: Path, dtype: str, steps: int, runs: int, latents, images_for, cond_area: int) -> dict:
    import torch
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    edit_plus.VAE_IMAGE_SIZE = E2E_SIDE ** 2  # the same per-reference area as our per-image policy
    edit_plus.CONDITION_IMAGE_SIZE = cond_area
    pipe = QwenImageEditPlusPipeline.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        pipe(image=images_for(i), prompt=PROMPT, num_inference_steps=1 if i == 0 else steps, width=E2E_SIDE,
             height=E2E_SIDE, latents=torch.from_numpy(latents.copy()).to(getattr(torch, dtype)), output_type="np",
             true_cfg_scale=1.0)
        if i:
            times.append(time.perf_counter() - t0)
    del pipe
    gc.collect()
    return {"median_s": statistics.median(times), "times_s": times}


OURS = {"ort": ("ort", None), "openvino:auto": ("openvino", None), "openvino:fp32": ("openvino", "fp32"),
        "openvino:bf16": ("openvino", "bf16")}


def bench_e2e(art: Path, model_dir: Path, steps: int, runs: int, threads: int, ours_backends: list[str],
              diffusers_dtypes: list[str]) -> dict:
    from uniref_deploy.runtime import latents as lat
    from uniref_deploy.runtime.manifest import Manifest
    from uniref_deploy.runtime.text import CONDITION_IMAGE_AREA
    from uniref_deploy.tools.profiling import procedural_images

    z = Manifest.load(art).model.latent_channels
    latents = lat.initial_noise(7, z, E2E_SIDE // 8, E2E_SIDE // 8)

    def images_for(i: int):
        return procedural_images(1, 1000 + i)  # fresh references every run: no cache hits

    rows = {}
    for spec in ours_backends:
        backend, precision = OURS[spec]
        label = f"ours_{spec.replace(':', '_')}"
        rows[label] = run_ours(art, backend, precision, steps, runs, latents, images_for, threads)
        print(f"  e2e {label:<22} {rows[label]['median_s']:.2f} s {rows[label]['precisions']}", flush=True)
    for dtype in diffusers_dtypes:
        label = f"diffusers_torch_{'fp32' if dtype == 'float32' else 'bf16'}"
        rows[label] = run_diffusers(model_dir, dtype, steps, runs, latents, images_for, CONDITION_IMAGE_AREA)
        print(f"  e2e {label:<22} {rows[label]['median_s']:.2f} s", flush=True)
    ours = {k: v["median_s"] for k, v in rows.items() if k.startswith("ours")}
    fastest = min(ours, key=ours.get)
    ratios: dict = {"fastest_ours": fastest}
    for peer in ("diffusers_torch_bf16", "diffusers_torch_fp32"):
        if peer in rows:
            ratios[f"fastest_ours_over_{peer}"] = ours[fastest] / rows[peer]["median_s"]
    if "ours_ort" in ours and "diffusers_torch_fp32" in rows:
        ratios["ort_fp32_over_diffusers_torch_fp32"] = ours["ours_ort"] / rows["diffusers_torch_fp32"]["median_s"]
    rows["ratios"] = ratios
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"one DiT step, {n}+{report['text_tokens']} tokens", report["dit_step"][n]) for n in report["dit_step"]]
    if "e2e" in report:
        panels.append((f"{report['steps']}-step edit end to end", {k: v for k, v in report["e2e"].items()
                                                                   if k != "ratios"}))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    for ax, (title, rows) in zip(np.atleast_1d(axes), panels, strict=True):
        labels = list(rows)
        ax.barh(labels, [rows[k]["median_s"] for k in labels], color="#4878a8")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("median seconds")
        ax.invert_yaxis()
    cpu = report["cpu"]
    fig.suptitle(f"{cpu['model']} ({report['threads']} threads; amx={cpu['amx']}, native bf16={cpu['native_bf16']}); "
                 f"load {report['load_before'][0]:.1f} -> {report['load_after'][0]:.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the diffusers folder the artifacts were exported from")
    ap.add_argument("--art", required=True, help="artifact folder (portable fp32 DiT; fused variant optional)")
    ap.add_argument("--tokens", default="512,3200", help="image-token counts of the DiT-step timing (2*n*n each)")
    ap.add_argument("--text-tokens", type=int, default=225)
    ap.add_argument("--runs", type=int, default=3, help="timed DiT calls per backend and size")
    ap.add_argument("--steps", type=int, default=28, help="end-to-end denoising steps")
    ap.add_argument("--e2e-runs", type=int, default=2, help="timed end-to-end edits per backend")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--e2e-backends", default="ort,openvino:auto,openvino:fp32",
                    help=f"our end-to-end variants, from {', '.join(OURS)}")
    ap.add_argument("--diffusers-dtypes", default="float32,bfloat16", help="torch dtypes of the diffusers runs")
    ap.add_argument("--dit-backends", default="",
                    help="comma-separated DiT-step rows to run (default all: ort_fp32, ort_fp32_fused, openvino_f32, "
                         "openvino_bf16, torch_fp32, torch_bf16, ort_int8_<mode>, openvino_int8_<mode>)")
    ap.add_argument("--int8-art", action="append", default=[],
                    help="another artifact folder whose INT8 DiT graphs get rows too (e.g. calibrated with "
                         "--activations dynamic); repeatable")
    ap.add_argument("--name", default="openvino_cpu", help="stem of the JSON and PNG written into --out")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-start", action="store_true", help="skip the OpenVINO first/second start timing")
    ap.add_argument("--out", default="bench_openvino_cpu")
    args = ap.parse_args(argv)

    import onnxruntime
    import openvino
    import torch

    from uniref_deploy.runtime.cpu import cpu_features

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    art, model_dir = Path(args.art), Path(args.model)
    report = {
        "cpu": cpu_features().to_dict(), "threads": args.threads, "load_before": list(os.getloadavg()),
        "versions": {"openvino": openvino.__version__, "onnxruntime": onnxruntime.__version__,
                     "torch": torch.__version__},
        "text_tokens": args.text_tokens, "runs": args.runs, "steps": args.steps, "e2e_runs": args.e2e_runs,
    }
    print(f"CPU {report['cpu']}; load {report['load_before']}", flush=True)
    partial = out / f"{args.name}.partial.json"  # rewritten after each part, so a killed run leaves its figures
    if not args.skip_start:
        report["openvino_start"] = bench_start(art, args.threads)
    report["dit_step"] = bench_dit(art, model_dir, [int(t) for t in args.tokens.split(",")], args.text_tokens,
                                   args.runs, args.threads, [b for b in args.dit_backends.split(",") if b],
                                   tuple(Path(a) for a in args.int8_art))
    partial.write_text(json.dumps(report, indent=2) + "\n")
    if not args.skip_e2e:
        report["e2e"] = bench_e2e(art, model_dir, args.steps, args.e2e_runs, args.threads,
                                  [b for b in args.e2e_backends.split(",") if b],
                                  [d for d in args.diffusers_dtypes.split(",") if d])
    report["load_after"] = list(os.getloadavg())
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    partial.unlink(missing_ok=True)
    plot(report, out / f"{args.name}.png")
    print(json.dumps({"dit_step": {n: {k: round(v["median_s"], 3) for k, v in rows.items()}
                                   for n, rows in report["dit_step"].items()},
                      "e2e": report.get("e2e", {}).get("ratios")}, indent=1))
    print(f"wrote {out / (args.name + '.json')}, {out / (args.name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
