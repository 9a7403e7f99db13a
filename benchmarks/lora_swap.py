"""Swap time of ``uniref-deploy lora`` against a full ``export --lora`` on a preset (issue 17 target: <= 0.2).

Usage: python benchmarks/lora_swap.py [--preset small] [--work DIR]. Builds the preset, writes two random rank-4
LoRAs (tests/export/lora_factory.py), exports with the first, swaps to the second; prints both times and the
ratio as JSON (also to benchmarks/results/lora_swap.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "export"))

from lora_factory import lora_factors, write_lora  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora_swap_bench"))
    parser.add_argument("--dtypes", default="fp32,fp16")
    args = parser.parse_args()

    import diffusers

    from uniref_deploy.presets import build_preset
    from uniref_deploy.tools.cli import main as cli

    model = build_preset(args.preset, args.work / args.preset, seed=0)
    transformer = diffusers.QwenImageTransformer2DModel.from_pretrained(model / "transformer")
    first = write_lora(lora_factors(transformer, seed=0), args.work / "first.safetensors", "peft")
    second = write_lora(lora_factors(transformer, seed=1), args.work / "second.safetensors", "kohya")
    del transformer
    art = args.work / "art"
    t0 = time.perf_counter()
    code = cli(["export", str(model), "--out", str(art), "--dtypes", args.dtypes, "--no-validate", "--force",
                "--lora", f"{first}:0.7"])
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    code |= cli(["lora", str(art), "--lora", f"{second}:0.5"])
    swap_s = time.perf_counter() - t0
    result = {"preset": args.preset, "dtypes": args.dtypes, "export_seconds": round(export_s, 1),
              "swap_seconds": round(swap_s, 2), "ratio": round(swap_s / export_s, 3), "exit_codes_ok": code == 0}
    out = Path(__file__).parent / "results" / "lora_swap.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
