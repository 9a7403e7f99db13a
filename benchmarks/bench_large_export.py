"""Benchmark the memory-lean DiT export (export/lean.py) on a full-size Qwen-Image transformer (~20B parameters).

    python benchmarks/bench_large_export.py --out reports/lean_bench            # 60 layers, ~40 GB
    python benchmarks/bench_large_export.py --layers 4 --out /tmp/lean_small    # quick check
    python benchmarks/bench_large_export.py --cli --dtype fp16 --lora-rank 16   # `uniref-deploy export --lean --lora`

1. writes a diffusers-style bf16 checkpoint of random weights shard by shard (never the whole model in memory):
   ``transformer/diffusion_pytorch_model-0000X-of-0000N.safetensors`` + index json + config.json;
2. copies the tensors of the first and last block aside (the reference for the checks);
3. runs ``export_dit_lean`` in a child process, sampling its RSS (psutil) and reading its ru_maxrss;
   with ``--consume-shards`` (default for this random checkpoint) each shard is deleted once streamed;
   with ``--lora-rank R`` a random rank-R LoRA on the attention and MLP linears of every block (both streams) is
   written first and fused while streaming; with ``--cli`` the child is ``uniref-deploy export MODEL --lean
   --consume-shards --no-validate`` on a full diffusers folder (random real-config VAE, scheduler, model_index);
4. checks the streamed initializers of those blocks byte for byte against the reference and runs one block forward
   in fp32 torch with weights read back from ``dit.onnx.data`` vs from the reference;
5. prints a table, writes ``DIR/lean_export_bench.json``, and deletes the big files unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

FULL_CONFIG = dict(num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                   in_channels=64, out_channels=16, axes_dims_rope=[16, 56, 56], patch_size=2, guidance_embeds=False)
GB = 1e9
CHUNK_ELEMS = 32 * 1024**2
POOL_ELEMS = 64 * 1024**2


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys and shapes of the transformer, from a meta-device model (no storage)."""
    import diffusers
    import torch

    with torch.device("meta"):
        model = diffusers.QwenImageTransformer2DModel.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def random_bf16(rng: np.random.Generator, n: int) -> bytes:
    """n random bf16 values: random sign and mantissa, |x| in [2^-7, 2^-3) (finite, sane magnitudes)."""
    r = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    return ((r & np.uint16(0x807F)) | ((((r >> np.uint16(7)) & np.uint16(3)) + np.uint16(0x78)) << np.uint16(7))).tobytes()


def write_checkpoint(root: Path, config: dict, shard_bytes: float, seed: int = 0, say=print) -> dict:
    """A random bf16 diffusers transformer folder under ``root/transformer``; returns sizes.

    Values come from a 128 MiB pool of random bf16 values read at random offsets (fast; not i.i.d. across tensors).
    """
    shapes = parameter_shapes(config)
    tdir = root / "transformer"
    tdir.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    rng = np.random.default_rng(seed)
    # a pool of random values, sliced at a random offset per chunk: generating 20B fresh values costs minutes of CPU
    pool = random_bf16(rng, POOL_ELEMS + CHUNK_ELEMS)
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for i, keys in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for key in keys:
            n = int(np.prod(shapes[key])) * 2
            header[key] = {"dtype": "BF16", "shape": list(shapes[key]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[key] = name
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(tdir / name, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for key in keys:
                left = int(np.prod(shapes[key]))
                while left:
                    n = min(left, CHUNK_ELEMS)
                    start = 2 * int(rng.integers(0, POOL_ELEMS))
                    f.write(pool[start:start + 2 * n])
                    left -= n
        total += offset
        say(f"bench: wrote {name} ({offset / GB:.2f} GB)")
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tdir / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel", **config}, indent=1))
    return {"parameters": total // 2, "checkpoint_bytes": total, "shards": len(shards),
            "write_seconds": round(time.perf_counter() - t0, 1)}


def copy_reference(tdir: Path, prefixes: list[str], dest: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Copy the tensors whose key starts with one of ``prefixes`` into ``dest/<key>.bin`` (raw bytes)."""
    from uniref_deploy.export.lean import checkpoint_index

    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, entry in checkpoint_index(tdir).items():
        if any(key.startswith(p) for p in prefixes):
            with open(entry.file, "rb") as f:
                f.seek(entry.start)
                (dest / f"{key}.bin").write_bytes(f.read(entry.nbytes))
            out[key] = (entry.dtype, entry.shape)
    return out


LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                "txt_mlp.net.2")


def write_lora(path: Path, config: dict, rank: int, seed: int = 1) -> dict:
    """A random bf16 rank-``rank`` LoRA (diffusers/PEFT keys) on ``LORA_TARGETS`` of every block; returns sizes."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shapes = parameter_shapes(config)
    tensors = {}
    for key, shape in shapes.items():
        module = key.removesuffix(".weight")
        if key.startswith("transformer_blocks.") and key.endswith(".weight") and module.endswith(LORA_TARGETS):
            out_f, in_f = shape
            tensors[f"transformer.{module}.lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).bfloat16()
            tensors[f"transformer.{module}.lora_B.weight"] = (torch.randn(out_f, rank, generator=gen) * 0.01).bfloat16()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return {"rank": rank, "layers": len(tensors) // 2, "parameters": sum(t.numel() for t in tensors.values()),
            "bytes": path.stat().st_size}


def write_pipeline_files(root: Path) -> None:
    """model_index.json, scheduler config and a random VAE of the published config (what `export` reads besides
    the transformer)."""
    import diffusers
    import torch

    real = json.loads(Path("/work/shared/real-configs/qwen-image-edit.json").read_text()) if Path(
        "/work/shared/real-configs/qwen-image-edit.json").is_file() else None
    vae_config = {k: v for k, v in (real["vae"] if real else {}).items() if not k.startswith("_")}
    torch.manual_seed(0)
    diffusers.AutoencoderKLQwenImage(**vae_config).save_pretrained(root / "vae")
    scheduler = {k: v for k, v in (real["scheduler"] if real else {}).items() if not k.startswith("_")}
    diffusers.FlowMatchEulerDiscreteScheduler(**scheduler).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "QwenImageEditPlusPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "transformer":
        ["diffusers", "QwenImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage"]}, indent=1))


def run_child(model_dir: Path, onnx_path: Path, dtype: str, consume: bool, stats_path: Path,
              lora: Path | None = None, cli: bool = False, code: str | None = None) -> dict:
    """The lean export in a child process (export_dit_lean, or ``code`` with the same argv, or with ``cli`` the
    `uniref-deploy export` command); peak RSS from psutil sampling and from ru_maxrss of the child."""
    import psutil

    if cli:
        art = onnx_path.parent
        cmd = [sys.executable, "-m", "uniref_deploy.tools.cli", "export", str(model_dir), "--out", str(art), "--lean",
               "--no-validate", "--dtypes", dtype, *(["--consume-shards"] if consume else []),
               *(["--lora", str(lora)] if lora else [])]
    else:
        code = code or ("import json,sys; from pathlib import Path; from uniref_deploy.export.lean import export_dit_lean as e; "
                "from uniref_deploy.export.lora import LoraSpec; "
                "s=e(sys.argv[1], sys.argv[2], None, dtype=sys.argv[3], progress=lambda m: print(m, flush=True), "
                "consume_shards=sys.argv[4]=='1', loras=[LoraSpec(Path(p)) for p in sys.argv[6:]]); "
                "s.pop('initializer_keys'); open(sys.argv[5],'w').write(json.dumps(s))")
        cmd = [sys.executable, "-c", code, str(model_dir), str(onnx_path), dtype, "1" if consume else "0",
               str(stats_path), *([str(lora)] if lora else [])]
    before = _children_maxrss()
    proc = subprocess.Popen(cmd)
    peak = {"rss": 0}

    def sample():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak["rss"] = max(peak["rss"], p.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.join()
    if rc != 0:
        raise SystemExit(f"bench: the export child failed with exit code {rc}")
    stats = json.loads(stats_path.read_text()) if not cli else _cli_stats(onnx_path.parent, dtype, wall)
    maxrss = _children_maxrss()
    stats.update(child_wall_seconds=round(wall, 1), child_peak_rss_sampled_bytes=peak["rss"],
                 child_ru_maxrss_bytes=maxrss if maxrss > before else None)
    return stats


def _cli_stats(art: Path, dtype: str, wall: float) -> dict:
    """The figures of a CLI export, from its manifest (graph info and export stage record)."""
    manifest = json.loads((art / "manifest.json").read_text())
    graph = next(g for g in manifest["graphs"] if g["name"] == "dit" and g["precision"] == dtype)
    lean = graph["info"].get("lean", {})
    stage = next(s for s in manifest["stages"] if s["stage"] == "export")
    data = art / (graph["file"] + ".data")
    return {"trace_seconds": lean.get("trace_seconds"), "stream_seconds": lean.get("stream_seconds"),
            "initializers": lean.get("initializers"), "lora_layers": lean.get("lora_layers"),
            "peak_rss_bytes": lean.get("peak_rss_bytes"), "seconds": stage["seconds"],
            "graph_bytes": (art / graph["file"]).stat().st_size, "data_bytes": data.stat().st_size,
            "streamed_bytes": data.stat().st_size, "smoke": graph["info"].get("smoke"),
            "stage_results": stage["results"], "wall_seconds": round(wall, 1)}


def _children_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def check_blocks(onnx_path: Path, ref_dir: Path, ref: dict, config: dict, blocks: list[int], dtype: str = "bf16",
                 deltas: dict | None = None) -> dict:
    """Byte-compare the streamed initializers with the reference copies (converted to ``dtype`` and LoRA-fused
    independently of the stream, through export/lean_lora.py's float32 math); for a plain bf16 export also one fp32
    block forward each way."""
    import onnx
    import torch

    from uniref_deploy.export.lean_lora import fuse_bytes

    deltas = deltas or {}
    onnx_type = {"bf16": onnx.TensorProto.BFLOAT16, "fp16": onnx.TensorProto.FLOAT16, "fp32": onnx.TensorProto.FLOAT}

    model = onnx.load(str(onnx_path), load_external_data=False)
    import ml_dtypes

    data = onnx_path.parent / (onnx_path.name + ".data")
    by_key = {}
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if "location" in ext:
            key = init.name.split("transformer.", 1)[1]  # inner.transformer.<key> / transformer.<key>
            by_key[key] = (int(ext["offset"]), int(ext["length"]))
    compared, mismatched, missing = 0, [], []
    with open(data, "rb") as f:
        streamed = {}
        for key in ref:
            if key not in by_key:
                missing.append(key)
                continue
            off, n = by_key[key]
            f.seek(off)
            streamed[key] = f.read(n)
            compared += n
            expected = (ref_dir / f"{key}.bin").read_bytes()
            if dtype != "bf16" or key in deltas:
                expected = fuse_bytes(expected, "BF16", ref[key][1], onnx_type[dtype], deltas.get(key, []))
            if streamed[key] != bytes(expected):
                mismatched.append(key)
    fused = sum(1 for k in ref if k in deltas and k in by_key)
    if dtype != "bf16" or deltas:
        return {"bytes_compared": compared, "mismatched": mismatched, "missing": missing, "lora_fused_compared": fused,
                "numeric": {}}
    numeric = {}
    import diffusers

    dim = config["num_attention_heads"] * config["attention_head_dim"]
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.standard_normal((1, 32, dim), dtype=np.float32))
    txt = torch.from_numpy(rng.standard_normal((1, 8, dim), dtype=np.float32))
    temb = torch.from_numpy(rng.standard_normal((1, dim), dtype=np.float32))
    half = config["attention_head_dim"] // 2
    rope = (torch.polar(torch.ones(32, half), torch.rand(32, half)), torch.polar(torch.ones(8, half), torch.rand(8, half)))
    for b in blocks:
        prefix = f"transformer_blocks.{b}."
        outs = []
        for source in (streamed, None):
            block = diffusers.models.transformers.transformer_qwenimage.QwenImageTransformerBlock(
                dim, config["num_attention_heads"], config["attention_head_dim"]).eval()
            state = {}
            for key, (_dtype, shape) in ref.items():
                if key.startswith(prefix):
                    raw = source[key] if source is not None and key in source else (ref_dir / f"{key}.bin").read_bytes()
                    arr = np.frombuffer(raw, dtype=ml_dtypes.bfloat16).astype(np.float32).reshape(shape)
                    state[key[len(prefix):]] = torch.from_numpy(arr)
            block.load_state_dict(state, strict=False)  # the last block's unused text-stream weights are not streamed
            with torch.no_grad():
                outs.append(block(img, txt, None, temb, rope)[1])
        scale = float(outs[1].abs().max())
        numeric[f"block_{b}"] = {"max_abs": float((outs[0] - outs[1]).abs().max()), "scale": scale}
    return {"bytes_compared": compared, "mismatched": mismatched, "missing": missing, "numeric": numeric}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path("reports/lean_export_bench"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lean_export_bench"))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--consume-shards", action=argparse.BooleanOptionalAction, default=True,
                    help="delete each shard of the (random) checkpoint once streamed (default on)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the exported files")
    ap.add_argument("--lora-rank", type=int, default=0, help="fuse a random LoRA of this rank (0: none)")
    ap.add_argument("--cli", action="store_true", help="run `uniref-deploy export --lean` (the CLI path) as the child")
    args = ap.parse_args(argv)
    config = {**FULL_CONFIG, "num_layers": args.layers}

    shapes = parameter_shapes(config)
    ckpt_bytes = sum(int(np.prod(s)) for s in shapes.values()) * 2
    out_bytes = ckpt_bytes * {"bf16": 1, "fp16": 1, "fp32": 2}[args.dtype]
    need = ckpt_bytes + (min(args.shard_gb * GB, ckpt_bytes) if args.consume_shards else out_bytes) + 2 * GB
    if args.consume_shards and out_bytes > ckpt_bytes:
        need += out_bytes - ckpt_bytes
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        print(f"bench: ABORT: {free / GB:.1f} GB free under {args.workdir}, need {need / GB:.1f} GB "
              f"(checkpoint {ckpt_bytes / GB:.1f} GB + export).", file=sys.stderr)
        return 2
    print(f"bench: {len(shapes)} tensors, {ckpt_bytes / 2 / 1e9:.2f} B parameters; {free / GB:.0f} GB free, "
          f"need {need / GB:.0f} GB")
    model_dir = args.workdir / "model"
    onnx_dir = args.workdir / "onnx"
    ref_dir = args.workdir / "reference"
    lora = args.workdir / "lora.safetensors" if args.lora_rank else None
    try:
        ckpt = write_checkpoint(model_dir, config, args.shard_gb * GB)
        if args.cli:
            write_pipeline_files(model_dir)
        lora_info = write_lora(lora, config, args.lora_rank) if lora else None
        blocks = sorted({0, args.layers - 1})
        prefixes = [f"transformer_blocks.{b}." for b in blocks] + ["img_in.", "proj_out.", "norm_out."]
        ref = copy_reference(model_dir / "transformer", prefixes, ref_dir)
        if args.consume_shards:
            print("bench: --consume-shards: each checkpoint shard is DELETED as soon as it has been streamed")
        onnx_dir.mkdir(parents=True, exist_ok=True)
        stats = run_child(model_dir, onnx_dir / "dit.onnx", args.dtype, args.consume_shards,
                          args.workdir / "stats.json", lora=lora, cli=args.cli)
        if args.cli:
            onnx_path = onnx_dir / next(g["file"] for g in json.loads((onnx_dir / "manifest.json").read_text())["graphs"]
                                        if g["name"] == "dit" and g["precision"] == args.dtype)
        else:
            onnx_path = onnx_dir / "dit.onnx"
        deltas = None
        if lora:
            from uniref_deploy.export.lean_lora import streamed_deltas
            from uniref_deploy.export.lora import LoraSpec

            deltas = streamed_deltas(config, [LoraSpec(lora)])
        checks = check_blocks(onnx_path, ref_dir, ref, config, blocks, args.dtype, deltas)
        result = {"config": config, "checkpoint": ckpt, "lora": lora_info, "cli": args.cli, "export": stats,
                  "checks": checks, "free_disk_gb_before": round(free / GB, 1)}
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lean_export_bench.json").write_text(json.dumps(result, indent=2))
    rows = [
        ("layers / parameters", f"{args.layers} / {ckpt['parameters'] / 1e9:.2f} B"),
        ("checkpoint (bf16 shards)", f"{ckpt['checkpoint_bytes'] / GB:.2f} GB in {ckpt['shards']} shard(s), "
                                     f"written in {ckpt['write_seconds']} s"),
        ("trace (meta device)", f"{stats['trace_seconds']} s"),
        ("stream into .data", f"{stats['stream_seconds']} s ({stats['streamed_bytes'] / GB / max(stats['stream_seconds'], 1e-3):.2f} GB/s)"),
        ("export total (child wall)", f"{stats['seconds']} s ({stats['child_wall_seconds']} s)"),
        ("dit.onnx / dit.onnx.data", f"{stats['graph_bytes'] / 1e6:.1f} MB / {stats['data_bytes'] / GB:.2f} GB"),
        ("peak RSS (ru_maxrss / sampled)", f"{(stats['child_ru_maxrss_bytes'] or stats['peak_rss_bytes']) / 2**30:.2f} GiB / "
                                           f"{stats['child_peak_rss_sampled_bytes'] / 2**30:.2f} GiB"),
        ("shards consumed", str(args.consume_shards)),
    ]
    if lora_info:
        rows.insert(1, ("LoRA (random, bf16, PEFT keys)", f"rank {lora_info['rank']} on {lora_info['layers']} layers, "
                                                          f"{lora_info['parameters'] / 1e6:.0f} M parameters; "
                                                          f"{stats.get('lora_layers')} fused while streaming"))
    if checks:
        rows.append((f"byte check (blocks {blocks} + io layers)",
                     f"{checks['bytes_compared'] / 1e6:.0f} MB compared, {len(checks['mismatched'])} mismatched, "
                     f"{len(checks['missing'])} not in graph (unused)"))
        for name, r in checks["numeric"].items():
            rows.append((f"fp32 forward {name}", f"max |diff| {r['max_abs']:.3g} (scale {r['scale']:.3g})"))
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{a.ljust(width)}  {b}" for a, b in rows))
    print(f"bench: wrote {args.out / 'lean_export_bench.json'}" + ("" if args.keep else f"; removed {args.workdir}"))
    ok = not checks or (not checks["mismatched"] and all(r["max_abs"] == 0 for r in checks["numeric"].values()))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
