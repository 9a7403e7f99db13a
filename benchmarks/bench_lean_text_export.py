"""Benchmark the memory-lean prompt-encoder export (export/lean_text.py) on the real Qwen2.5-VL-7B config.

    python benchmarks/bench_lean_text_export.py --out benchmarks/results/lean_text_7b     # 28 layers, ~16.6 GB
    python benchmarks/bench_lean_text_export.py --text-layers 2 --vision-depth 4 --workdir /tmp/lt   # quick check

1. writes a text_encoder/ folder with the published config.json (Qwen-Image-Edit's, transformers 4.x layout) and
   random bf16 safetensors shards in the published key layout (``model.*``, ``visual.*``, ``lm_head``), shard by
   shard (values from a pool of random bf16, as bench_large_export.py does);
2. copies the first and last LM layer, the first and last vision block, the merger and the first/last rows of the
   embedding table aside (the reference for the byte checks);
3. runs ``export_text_lean`` (fp16 by default) in a child process, sampling its RSS (psutil) and reading ru_maxrss;
   with ``--consume-shards`` (default) the shards are deleted while the language model streams;
4. compares the streamed initializers of those tensors with the reference, converted to the graph's dtype, byte for
   byte, and the embedding rows of ``embed_tokens.npy`` / ``embed_tokens.fp16.npy``;
5. prints a table, writes ``OUT/lean_text_export_bench.json`` and deletes the big files unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_large_export import CHUNK_ELEMS, GB, POOL_ELEMS, random_bf16, run_child  # noqa: E402

REAL_CONFIG = Path(__file__).resolve().parents[1] / "presets" / "real_configs" / "qwen-image-edit.json"
EMBED_ROWS = 4096


def text_config(layers: int, depth: int) -> dict:
    """The published text-encoder config (flat transformers 4.x layout) with ``layers`` LM layers, ``depth`` blocks."""
    cfg = {k: v for k, v in json.loads(REAL_CONFIG.read_text())["text_encoder"].items() if not k.startswith("_")}
    vision = dict(cfg["vision_config"])
    if depth != vision["depth"]:
        vision.update(depth=depth, fullatt_block_indexes=[i for i in vision["fullatt_block_indexes"] if i < depth]
                      or [depth - 1])
    return {**cfg, "num_hidden_layers": layers, "vision_config": vision}


def saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys (published layout) and shapes, from a meta-device model of ``folder/config.json``."""
    from uniref_deploy.export.lean_text import SAVED_PREFIXES, meta_text_model

    out = {}
    for name, t in meta_text_model(folder).state_dict().items():
        for new, saved in SAVED_PREFIXES:
            if name.startswith(new):
                name = saved + name[len(new):]
        out[name] = tuple(t.shape)
    return out


def write_checkpoint(tdir: Path, config: dict, shard_bytes: float, seed: int = 0) -> dict:
    """Random bf16 shards + index json + config.json under ``tdir``; never more than one chunk in memory."""
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "config.json").write_text(json.dumps(config, indent=1))
    shapes = saved_shapes(tdir)
    # the vision tower, the embedding table and lm_head in shards of their own, so a consuming export frees them
    # as soon as their step is done (the exporter takes any layout; this one keeps the disk peak low)
    shards: list[list[str]] = []
    for group in ("visual.", "model.embed_tokens.", "lm_head.", ""):
        keys = [k for k in shapes if k.startswith(group) and not any(
            k.startswith(g) for g in ("visual.", "model.embed_tokens.", "lm_head.") if g != group)]
        shards.append([])
        size = 0
        for key in keys:
            nbytes = int(np.prod(shapes[key])) * 2
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(key)
            size += nbytes
    shards = [s for s in shards if s]
    rng = np.random.default_rng(seed)
    pool = random_bf16(rng, POOL_ELEMS + CHUNK_ELEMS)
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
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
        print(f"bench: wrote {name} ({offset / GB:.2f} GB)", flush=True)
    (tdir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"parameters": total // 2, "checkpoint_bytes": total, "shards": len(shards),
            "write_seconds": round(time.perf_counter() - t0, 1)}


def copy_reference(tdir: Path, prefixes: list[str], dest: Path) -> dict[str, list[int]]:
    """Raw bytes of the tensors under ``prefixes`` (and the embedding table's first/last rows) into ``dest``."""
    from uniref_deploy.export.lean import checkpoint_index

    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, entry in checkpoint_index(tdir).items():
        with open(entry.file, "rb") as f:
            if any(key.startswith(p) for p in prefixes):
                f.seek(entry.start)
                (dest / f"{key}.bin").write_bytes(f.read(entry.nbytes))
                out[key] = list(entry.shape)
            elif key == "model.embed_tokens.weight":
                row = entry.shape[1] * 2
                f.seek(entry.start)
                head = f.read(EMBED_ROWS * row)
                f.seek(entry.end - EMBED_ROWS * row)
                (dest / "embed.bin").write_bytes(head + f.read(EMBED_ROWS * row))
    return out


def check_bytes(onnx_dir: Path, text_dir: Path, stats: dict, ref_dir: Path, ref: dict) -> dict:
    """Streamed initializers and embedding rows vs the reference converted to the stored dtype, byte for byte."""
    import ml_dtypes
    import onnx

    np_type = {onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.FLOAT: np.float32,
               onnx.TensorProto.BFLOAT16: ml_dtypes.bfloat16}
    compared, mismatched, seen = 0, [], set()
    for graph in ("text_vision", "text_encoder"):
        path = next(onnx_dir.glob(f"{graph}*.onnx"))
        keys = stats[graph]["keys"]
        model = onnx.load(str(path), load_external_data=False)
        with open(path.parent / f"{path.name}.data", "rb") as data:
            for init in model.graph.initializer:
                key = keys.get(init.name)
                if key not in ref:
                    continue
                ext = {e.key: e.value for e in init.external_data}
                data.seek(int(ext["offset"]))
                got = data.read(int(ext["length"]))
                want = np.frombuffer((ref_dir / f"{key}.bin").read_bytes(), ml_dtypes.bfloat16)
                compared += len(got)
                seen.add(key)
                if got != want.astype(np_type[init.data_type]).tobytes():
                    mismatched.append(key)
    embed = np.frombuffer((ref_dir / "embed.bin").read_bytes(), ml_dtypes.bfloat16).reshape(2 * EMBED_ROWS, -1)
    for name, dtype in (("embed_tokens.npy", np.float32), ("embed_tokens.fp16.npy", np.float16)):
        if (text_dir / name).is_file():
            table = np.load(text_dir / name, mmap_mode="r")
            got = np.concatenate([table[:EMBED_ROWS], table[-EMBED_ROWS:]])
            compared += got.nbytes
            if got.tobytes() != embed.astype(dtype).tobytes():
                mismatched.append(name)
    return {"bytes_compared": compared, "mismatched": mismatched, "missing": sorted(set(ref) - seen)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-layers", type=int, default=28)
    ap.add_argument("--vision-depth", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lean_text_export"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lean_text_bench"))
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"))
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--consume-shards", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the exported files")
    args = ap.parse_args(argv)
    config = text_config(args.text_layers, args.vision_depth)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.workdir / "model"
    shapes = saved_shapes_for(config, args.workdir)
    ckpt_bytes = sum(int(np.prod(s)) for s in shapes.values()) * 2
    out_bytes = ckpt_bytes * (1 if args.dtype == "fp16" else 2) * 0.95 + ckpt_bytes * 0.2
    need = ckpt_bytes + (0.25 * out_bytes if args.consume_shards else out_bytes) + 2 * GB
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        print(f"bench: ABORT: {free / GB:.1f} GB free, need ~{need / GB:.1f} GB", file=sys.stderr)
        return 2
    print(f"bench: {len(shapes)} tensors, {ckpt_bytes / 2e9:.2f} B parameters; {free / GB:.0f} GB free, "
          f"need ~{need / GB:.0f} GB", flush=True)
    try:
        ckpt = write_checkpoint(model_dir / "text_encoder", config, args.shard_gb * GB)
        last, depth = args.text_layers - 1, args.vision_depth - 1
        prefixes = [f"model.layers.{i}." for i in sorted({0, last})] + [f"visual.blocks.{i}." for i in sorted({0, depth})]
        prefixes += ["visual.merger.", "visual.patch_embed.", "model.norm."]
        ref = copy_reference(model_dir / "text_encoder", prefixes, args.workdir / "reference")
        code = ("import json,sys; from uniref_deploy.export.lean_text import export_text_lean as e; "
                "s=e(sys.argv[1], sys.argv[2], sys.argv[2] + '/text', dtype=sys.argv[3], "
                "progress=lambda m: print(m, flush=True), consume_shards=sys.argv[4]=='1'); "
                "open(sys.argv[5],'w').write(json.dumps(s))")
        stats = run_child(model_dir, args.workdir / "art", args.dtype, args.consume_shards,
                          args.workdir / "stats.json", code=code)
        checks = check_bytes(args.workdir / "art", args.workdir / "art" / "text", stats, args.workdir / "reference", ref)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    for graph in ("text_vision", "text_encoder"):
        stats[graph].pop("keys", None)
    result = {"config": config, "checkpoint": ckpt, "export": stats, "checks": checks,
              "free_disk_gb_before": round(free / GB, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lean_text_export_bench.json").write_text(json.dumps(result, indent=2))
    v, t = stats["text_vision"], stats["text_encoder"]
    rows = [
        ("LM layers / vision depth / parameters", f"{args.text_layers} / {args.vision_depth} / {ckpt['parameters'] / 1e9:.2f} B"),
        ("checkpoint (bf16 shards)", f"{ckpt['checkpoint_bytes'] / GB:.2f} GB in {ckpt['shards']} shard(s), "
                                     f"written in {ckpt['write_seconds']} s"),
        ("text_vision trace / stream", f"{v['trace_seconds']} s / {v['stream_seconds']} s, {v['data_bytes'] / GB:.2f} GB"),
        ("embedding tables", f"{stats.get('embed_tokens', {}).get('seconds')} s"),
        ("text_encoder trace / stream", f"{t['trace_seconds']} s / {t['stream_seconds']} s, {t['data_bytes'] / GB:.2f} GB"),
        ("export total (child wall)", f"{stats['child_wall_seconds']} s"),
        ("peak RSS (ru_maxrss / sampled)", f"{(stats['child_ru_maxrss_bytes'] or stats['peak_rss_bytes']) / 2**30:.2f} GiB / "
                                           f"{stats['child_peak_rss_sampled_bytes'] / 2**30:.2f} GiB"),
        ("byte check", f"{checks['bytes_compared'] / 1e6:.0f} MB compared, {len(checks['mismatched'])} mismatched, "
                       f"{len(checks['missing'])} missing"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{a.ljust(width)}  {b}" for a, b in rows))
    return 0 if not checks["mismatched"] and not checks["missing"] else 1


def saved_shapes_for(config: dict, workdir: Path) -> dict[str, tuple[int, ...]]:
    """``saved_shapes`` of ``config`` (written to a scratch folder first)."""
    scratch = workdir / "config-only"
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "config.json").write_text(json.dumps(config))
    try:
        return saved_shapes(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
