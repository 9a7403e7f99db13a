"""FP8 accuracy by Q/DQ source graph: the old road (from the fp32 DiT) beside the new (from the fp16 DiT).

Compiles a preset (tiny by default) once, calibrates two copies (one with the fp16 DiT hidden from the manifest,
so calibration falls back to the fp32 graph) and prints the accuracy report's figures per bucket (velocity
cosine, latent/image PSNR vs fp32, on ONNX Runtime CPU).

    python benchmarks/fp8_source_accuracy.py [--preset tiny] [--work /tmp/fp8_source] [--steps 8 --samples 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

from uniref_deploy.calibration.fp8 import CalibrationOptions, calibrate_fp8
from uniref_deploy.runtime.graphs import DIT
from uniref_deploy.runtime.manifest import Manifest
from uniref_deploy.tools.compile_job import compile_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--work", default="/tmp/fp8_source")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    args = ap.parse_args()
    work = Path(args.work)
    base = work / f"{args.preset}-art"
    if not (base / "manifest.json").is_file():
        compile_model(args.preset, base, [1024 * 1024], ["fp16"], say=print)
    options = CalibrationOptions(samples=args.samples, eval_steps=args.steps, max_pixels=256 * 256, force=True)
    for source in ("fp32", "fp16"):
        art = work / f"{args.preset}-from-{source}"
        shutil.rmtree(art, ignore_errors=True)
        shutil.copytree(base, art, symlinks=True)
        if source == "fp32":
            m = Manifest.load(art)
            m = dataclasses.replace(m, graphs=tuple(g for g in m.graphs if g.key != f"{DIT}.fp16"
                                                    and not (g.name == DIT and g.precision == "fp16")))
            m.save(art)
        t0 = time.perf_counter()
        manifest = calibrate_fp8(art, options)
        info = manifest.graph(DIT, "fp8").info
        print(f"\nfp8 from {source} ({time.perf_counter() - t0:.0f} s), weights {info['weight_scales']}, "
              f"fp8 file {info['sizes'].get('fp8_file_bytes', 0) / 2**20:.2f} MiB")
        for bucket, fig in info["figures"].items():
            print(f"  {bucket}: " + ", ".join(f"{k} {v}" for k, v in fig.items()))


if __name__ == "__main__":
    main()
