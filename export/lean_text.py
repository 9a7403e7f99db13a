"""Memory-lean export of the prompt encoder (``text_vision`` + ``text_encoder``) from its safetensors shards.

The same machinery as the DiT's lean export (``export/lean.py``): Qwen2.5-VL is built on the meta device, each
wrapper is traced without weights, and every weight is declared as an external initializer whose bytes are copied
(converted per chunk when the precision differs) from the checkpoint shards into ``<graph>.onnx.data``. The
token-embedding table is streamed the same way into ``ART/text/embed_tokens*.npy``. Peak memory is the traced
graph plus one chunk, whatever the model size (7B: see docs/benchmarks/README.md).

Checkpoint keys: transformers 5 names the modules ``model.language_model.*`` / ``model.visual.*`` but saves (and
the published checkpoints hold) ``model.*`` / ``visual.*``; both layouts are accepted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from uniref_deploy.runtime.encoder_io import (
    EMBED_TABLE,
    EMBED_TABLE_FP16,
    TEXT_ENCODER,
    TEXT_VISION,
    EncoderDims,
    text_graph_io,
)
from uniref_deploy.runtime.errors import ExportError
from uniref_deploy.runtime.fileio import make_temp_dir

from .graph_export import DEFAULT_OPSET
from .lean import (
    ALIGNMENT,
    CHUNK_BYTES,
    ST_DTYPES,
    SafetensorsEntry,
    _convert,
    _external_initializer,
    checkpoint_index,
    peak_rss_bytes,
    save_lean_graph,
    stream_plan,
    stream_tensors,
    trace_meta_module,
)
from .precision import DTYPES, Float32Island, IOCast
from .text_encoder import fp16_text_islands, text_modules
from .text_export import FLOAT32_INPUTS

Progress = Callable[[str], None]
EXAMPLE = {"patches": 40, "merged": 10, "text_len": 11}  # meta example sizes, distinct from every static size
SAVED_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def checkpoint_key(name: str, available) -> str | None:
    """The checkpoint key of module parameter ``name`` (either naming layout), or None."""
    if name in available:
        return name
    for new, saved in SAVED_PREFIXES:
        if name.startswith(new) and saved + name[len(new):] in available:
            return saved + name[len(new):]
    return None


def meta_text_model(text_encoder_dir: Path) -> torch.nn.Module:
    """``Qwen2_5_VLForConditionalGeneration`` from ``config.json`` on the meta device (no storage)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(text_encoder_dir)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32).eval()


def _at_precision(module: torch.nn.Module, name: str, dtype: str) -> tuple[torch.nn.Module, list[str]]:
    """``module`` cast in place to ``dtype`` with its norms as fp32 islands (parameters keep their identity)."""
    if dtype == "fp32":
        return module, []
    keep = fp16_text_islands(module)
    module.to(DTYPES[dtype])
    for path in keep:
        parent_name, _, child = path.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, Float32Island(getattr(parent, child)))  # .float() on meta keeps the Parameter objects
    return IOCast(module, DTYPES[dtype], keep_float32=FLOAT32_INPUTS[name]).eval(), keep


def _meta_args(name: str, config: dict) -> tuple:
    inputs, _ = text_graph_io(name, config)
    return tuple(torch.empty([EXAMPLE[d] if isinstance(d, str) else int(d) for d in s.shape],
                             dtype=getattr(torch, s.dtype), device="meta") for s in inputs)


def _write_graph(program, declared: dict, plan: list, out_path: Path, name: str, config: dict, say: Progress,
                 consume: bool) -> dict:
    """Stream ``plan`` into ``out_path.data`` and save the graph with external initializers pointing at it."""
    import onnx_ir as ir

    tmp_dir = make_temp_dir(out_path)
    try:
        location = out_path.name + ".data"
        t0 = time.perf_counter()
        locations = stream_tensors(plan, tmp_dir / location, consume=consume, progress=say)
        seconds = time.perf_counter() - t0
        model = ir.to_proto(program.model)
        for init, (shape, onnx_dtype) in declared.items():
            model.graph.initializer.append(_external_initializer(init, shape, onnx_dtype, location, *locations[init]))
        save_lean_graph(model, text_graph_io(name, config), tmp_dir, out_path, location)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"stream_seconds": round(seconds, 2), "data_bytes": (out_path.parent / location).stat().st_size}


def export_text_graph_lean(model_dir: Path, name: str, out_path: Path, dtype: str = "fp16",
                           progress: Progress | None = None, opset: int = DEFAULT_OPSET,
                           consume_shards: bool = False, ckpt: dict[str, SafetensorsEntry] | None = None) -> dict:
    """Export one text graph of ``model_dir`` (diffusers root) to ``out_path`` + ``.data``, streamed; stats.

    ``ckpt``: the checkpoint's tensors (read from its headers when None).
    """
    say = progress or (lambda msg: None)
    tdir = model_dir / "text_encoder"
    config = json.loads((tdir / "config.json").read_text())
    t0 = time.perf_counter()
    say(f"lean export: {name} {dtype}: building Qwen2.5-VL on the meta device and tracing")
    model = meta_text_model(tdir)
    keys = {id(t): k for k, t in model.named_parameters()}
    module = dict(zip((TEXT_VISION, TEXT_ENCODER), text_modules(model), strict=True))[name]
    module, keep = _at_precision(module, name, dtype)
    inputs, outputs = text_graph_io(name, config)
    program, declared = trace_meta_module(module, _meta_args(name, config), inputs, outputs, opset)
    names = {n: keys[id(t)] for n, t in module.named_parameters() if id(t) in keys}
    stats = {"dtype": dtype, "trace_seconds": round(time.perf_counter() - t0, 2), "fp32_layers": keep,
             "parameters": sum(p.numel() for p in module.parameters())}
    del module, model
    ckpt = ckpt if ckpt is not None else checkpoint_index(tdir)
    keys = {init: checkpoint_key(names.get(init, ""), ckpt) for init in declared}
    plan = stream_plan(declared, keys, ckpt, "Lean text export")
    say(f"lean export: {name}: streaming {len(plan)} tensors into {out_path.name}.data")
    stats.update(_write_graph(program, declared, plan, out_path, name, config, say, consume_shards))
    stats.update(initializers=len(plan), streamed_bytes=sum(e.nbytes for _, e, _ in plan),
                 seconds=round(time.perf_counter() - t0, 2), graph_bytes=out_path.stat().st_size,
                 peak_rss_bytes=peak_rss_bytes(),
                 keys={init: entry.key for init, entry, _ in plan})
    return stats


def embedding_entry(model_dir: Path, ckpt: dict[str, SafetensorsEntry] | None = None) -> SafetensorsEntry:
    """The checkpoint entry of the language model's token-embedding table."""
    ckpt = ckpt if ckpt is not None else checkpoint_index(model_dir / "text_encoder")
    key = checkpoint_key("model.language_model.embed_tokens.weight", ckpt)
    if key is None:
        raise ExportError("The text encoder checkpoint has no token-embedding table.", "is the checkpoint complete?")
    return ckpt[key]


def embedding_rows(entry: SafetensorsEntry) -> Callable[[int, int], np.ndarray]:
    """``rows(start, stop)`` -> float32 rows of the table, read from its shard (one chunk at a time)."""
    width = entry.shape[1]
    item = ST_DTYPES[entry.dtype][2]

    def rows(start: int, stop: int) -> np.ndarray:
        with open(entry.file, "rb") as f:
            f.seek(entry.start + start * width * item)
            raw = f.read((stop - start) * width * item)
        return np.frombuffer(_convert(raw, entry.dtype, onnx.TensorProto.FLOAT), np.float32).reshape(stop - start, width)

    return rows


def _component(key: str) -> str:
    """Which export step reads checkpoint tensor ``key``: "vision", "embed", "encoder" or "unused" (lm_head)."""
    if "visual." in key:
        return "vision"
    if key.endswith("embed_tokens.weight"):
        return "embed"
    return "unused" if key.startswith("lm_head") else "encoder"


def _release(ckpt: dict[str, SafetensorsEntry], done: set[str], say: Progress) -> None:
    """Delete the shards whose tensors only the finished steps ``done`` (and no later one) read."""
    later = {"vision", "embed", "encoder"} - done
    files: dict[Path, set[str]] = {}
    for key, entry in ckpt.items():
        files.setdefault(entry.file, set()).add(_component(key))
    for path, parts in files.items():
        if not parts & later and path.exists():
            path.unlink()
            say(f"lean export: deleted {path.name} (no later step reads it)")


def export_text_lean(model_dir: str | os.PathLike, onnx_dir: str | os.PathLike, text_dir: str | os.PathLike | None,
                     dtype: str = "fp16", progress: Progress | None = None, opset: int = DEFAULT_OPSET,
                     consume_shards: bool = False) -> dict:
    """Both text graphs at ``dtype`` into ``onnx_dir`` and (when ``text_dir``) the embedding tables; stats.

    Order: vision graph, embedding tables, language model. With ``consume_shards`` the checkpoint's shards are
    DELETED as soon as no later step reads them (a shard holding only unused tensors, e.g. ``lm_head``, at once;
    during the language model's streaming, each shard after its last tensor).
    """
    from .text_files import write_embedding_table

    model_dir, onnx_dir = Path(model_dir), Path(onnx_dir)
    tdir = model_dir / "text_encoder"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: None)
    suffix = "" if dtype == "fp32" else f".{dtype}"
    ckpt = checkpoint_index(tdir)  # once: shards may be deleted on the way
    release = (lambda done: _release(ckpt, done, say)) if consume_shards else (lambda done: None)
    release(set())
    entry = embedding_entry(model_dir, ckpt) if text_dir is not None else None
    stats: dict = {TEXT_VISION: export_text_graph_lean(model_dir, TEXT_VISION, onnx_dir / f"{TEXT_VISION}{suffix}.onnx",
                                                       dtype, say, opset, ckpt=ckpt)}
    release({"vision"} if text_dir is not None else {"vision", "embed"})
    if entry is not None:
        t0 = time.perf_counter()
        Path(text_dir).mkdir(parents=True, exist_ok=True)
        say(f"lean export: token-embedding table {entry.shape} -> {text_dir}")
        write_embedding_table(embedding_rows(entry), entry.shape, Path(text_dir), fp16=dtype == "fp16")
        stats["embed_tokens"] = {"seconds": round(time.perf_counter() - t0, 2), "shape": list(entry.shape),
                                 "files": [EMBED_TABLE] + ([EMBED_TABLE_FP16] if dtype == "fp16" else [])}
        release({"vision", "embed"})
    stats[TEXT_ENCODER] = export_text_graph_lean(model_dir, TEXT_ENCODER, onnx_dir / f"{TEXT_ENCODER}{suffix}.onnx",
                                                 dtype, say, opset, consume_shards=consume_shards, ckpt=ckpt)
    stats["peak_rss_bytes"] = peak_rss_bytes()
    stats["dims"] = EncoderDims.from_config(json.loads((tdir / "config.json").read_text())).__dict__
    return stats


__all__ = ["ALIGNMENT", "CHUNK_BYTES", "export_text_lean", "export_text_graph_lean", "checkpoint_key"]
