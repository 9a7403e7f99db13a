"""FP8 accuracy by Q/DQ source graph: the old road (from the fp32 DiT) beside the new (from the fp16 DiT).

Exports a preset (tiny by default; ``--outliers`` builds it with activation outliers, ``presets/outliers.py``)
once at the 1024 bucket (fp32 + fp16, no full validation, no ORT fusions, fp16 ranges measured on layouts packed
at 512² instead of the bucket's 1024²), calibrates two copies (one with the fp16 DiT hidden from the manifest, so
calibration falls back to the fp32 graph) and prints the accuracy report's figures per bucket (velocity cosine,
latent/image PSNR vs fp32, on ONNX Runtime CPU); ``--out`` also writes them as JSON.

    python benchmarks/fp8_source_accuracy.py [--preset tiny] [--outliers] [--work /tmp/fp8_source] \
        [--steps 8 --samples 4] [--weights auto|per-channel|per-tensor] [--out result.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from uniref_deploy.calibration.fp8 import CalibrationOptions, calibrate_fp8
from uniref_deploy.export.exporter import ExportOptions, export_onnx
from uniref_deploy.presets import build_preset
from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.graphs import DIT
from uniref_deploy.runtime.manifest import Manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--outliers", action="store_true", help="build the preset with activation outliers")
    ap.add_argument("--work", default="/tmp/fp8_source")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--sources", default="fp32,fp16", help="Q/DQ source graphs to calibrate from")
    ap.add_argument("--weights", choices=("auto", "per-channel", "per-tensor"), default="auto",
                    help="weight scales (auto: calibration measures both and keeps the better)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the artifact folders (default: delete the copies)")
    args = ap.parse_args()
    work = Path(args.work)
    name = f"{args.preset}{'-outliers' if args.outliers else ''}"
    base = work / f"{name}-art"
    if not (base / "manifest.json").is_file():
        model = build_preset(args.preset, work / f"{name}-model", seed=0, outliers=args.outliers)
        export_onnx(model, base, ExportOptions(budgets=(Budget.from_side(1024),), dtypes=("fp32", "fp16"),
                                               validate=False, ort_fusions=False, validation_area=512 * 512),
                    progress=print)
    per_channel = {"auto": None, "per-channel": True, "per-tensor": False}[args.weights]
    options = CalibrationOptions(samples=args.samples, eval_steps=args.steps, max_pixels=256 * 256,
                                 per_channel=per_channel, force=True)
    result = {"preset": args.preset, "outliers": args.outliers, "settings": options.settings(), "runs": {}}
    for source in args.sources.split(","):
        art = work / f"{name}-from-{source}"
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
        seconds = time.perf_counter() - t0
        print(f"\n{name}: fp8 from {source} ({seconds:.0f} s), weights {info['weight_scales']}, "
              f"fp8 file {info['sizes'].get('fp8_file_bytes', 0) / 2**20:.2f} MiB", flush=True)
        for bucket, fig in info["figures"].items():
            print(f"  {bucket}: " + ", ".join(f"{k} {v}" for k, v in fig.items()), flush=True)
        result["runs"][source] = {"source": info["source"], "weight_scales": info["weight_scales"],
                                  "figures": info["figures"], "sizes": info["sizes"], "seconds": round(seconds, 1)}
        if args.out:  # rewritten after every run, so a killed run keeps what it measured
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(art, ignore_errors=True)


if __name__ == "__main__":
    main()
