"""Text-encode time on the ``small`` preset: the compiled prompt encoder (host side + the two exported fp32 text
graphs in ONNX Runtime CPU) vs transformers' Qwen2.5-VL in torch fp32 and bf16, same run, same prompt and
references, median of ``--runs`` after one warm-up, caches cleared every run. Writes JSON + PNG.

    python benchmarks/text_encode.py [--model DIR] [--refs 2] [--runs 5] [--out /tmp/text_encode]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uniref_deploy.export.graph_export import DEFAULT_OPSET
from uniref_deploy.export.text_export import load_text, text_jobs
from uniref_deploy.export.text_files import write_text_files
from uniref_deploy.presets import build_preset
from uniref_deploy.runtime.text import QwenPromptEncoder
from uniref_deploy.runtime.text_host import TextHost
from uniref_deploy.runtime.text_onnx import CompiledPromptEncoder

PROMPT = "Put the person from picture 1 into the room from picture 2, keep the warm evening light 🌇"


def export_text(model_dir: Path, out: Path) -> tuple[Path, dict[str, Path]]:
    """The fp32 text graphs (the exporter's jobs) and ``out/text/``."""
    refs = load_text(model_dir)
    graphs = {}
    for job in text_jobs(refs, "fp32", DEFAULT_OPSET, validate=False):
        graphs[job["name"]] = out / f"{job['name']}.onnx"
        job["write"](graphs[job["name"]])
    table = refs.model.model.language_model.embed_tokens.weight.detach()
    write_text_files(model_dir, out, lambda a, b: table[a:b].float().numpy(), tuple(table.shape), fp16=False)
    return out / "text", graphs


def ort_runner(path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(None, dict(feeds)), strict=True))


def timed(encode, runs: int) -> tuple[list[float], np.ndarray]:
    out = encode()  # warm-up (session/graph init, allocations)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = encode()
        times.append(time.perf_counter() - t0)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="small preset folder (built when omitted)")
    ap.add_argument("--refs", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("/tmp/text_encode"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="text_encode_"))
    model_dir = args.model or build_preset("small", work / "small", seed=0)
    text_dir, graphs = export_text(model_dir, work)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((768, 1024), (1024, 640), (512, 512))[:args.refs]]

    ours = CompiledPromptEncoder(TextHost.from_dir(text_dir, "sequential"), np.load(text_dir / "embed_tokens.npy",
                                 mmap_mode="r"), ort_runner(graphs["text_vision"]), ort_runner(graphs["text_encoder"]))
    results, outputs = {}, {}

    def run_ours():
        ours._cache.clear()
        return ours.encode(PROMPT, images)[0]

    results["uniref ORT fp32"], outputs["ours"] = timed(run_ours, args.runs)
    for dtype in ("float32", "bfloat16"):
        enc = QwenPromptEncoder(model_dir, dtype=dtype)

        def run_torch(enc=enc):
            enc._cache.clear()
            with torch.inference_mode():
                return enc.encode(PROMPT, images)[0]

        results[f"transformers torch {dtype}"], outputs[dtype] = timed(run_torch, args.runs)
    ref = outputs["float32"]
    record = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "model": "small preset", "references": args.refs, "tokens": int(ref.shape[1]), "runs": args.runs,
        "median_seconds": {k: statistics.median(v) for k, v in results.items()},
        "seconds": results,
        "max_abs_vs_fp32_over_scale": {
            "uniref ORT fp32": float(np.abs(outputs["ours"] - ref).max() / np.abs(ref).max()),
            "transformers torch bfloat16": float(np.abs(outputs["bfloat16"] - ref).max() / np.abs(ref).max()),
        },
    }
    (args.out / "text_encode_small.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record["median_seconds"], indent=2), json.dumps(record["max_abs_vs_fp32_over_scale"]))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(record["median_seconds"])
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(names, [record["median_seconds"][n] for n in names], color=["tab:green", "tab:blue", "tab:orange"])
    ax.set_xlabel(f"median seconds per prompt ({args.refs} refs, {record['tokens']} tokens, {args.runs} runs)")
    ax.set_title("Text encode, small preset, CPU")
    fig.tight_layout()
    fig.savefig(args.out / "text_encode_small.png", dpi=120)


if __name__ == "__main__":
    main()
