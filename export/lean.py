"""Memory-lean DiT export: trace on the meta device, stream the checkpoint's safetensors into external data.

A DiT larger than RAM cannot go through ``export_graph`` (which needs the weights in memory twice: torch and the
ONNX proto). Here the weights never exist in full precision, or at all, in this process:

    1. build ``QwenImageTransformer2DModel`` from its config on ``torch.device("meta")`` (no storage), wrap it as
       ``QwenImageDitForExport`` (+ ``IOCast`` for fp16/bf16), and run ``torch.onnx.export(dynamo=True)`` with meta
       example inputs; the program's initializers are meta tensors (shape and dtype only);
    2. run the same onnxscript optimizer as ``export_graph`` with the weights hidden from constant folding (what
       it already does for any weight over its size limit, i.e. every large weight of a real model);
    3. declare each weight as an EXTERNAL initializer (location ``<graph>.data``, offset, length) and fill that one
       file by copying byte ranges of the safetensors shards in chunks (converting the dtype per chunk when the
       graph's precision differs from the checkpoint's).

    before: safetensors ──► torch fp32 model (4 B/param) ──► ONNX proto in memory ──► dit.onnx + dit.onnx.data
    after:  config ──► meta model ──► graph without data;   safetensors ──(64 MiB chunks)──► dit.onnx.data

Initializers map to checkpoint keys through parameter identity (wrapper prefixes such as ``inner.transformer.``
never need parsing). Constants made by the exporter (shapes, scalars) stay inline in the graph proto.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from uniref_deploy.runtime.errors import ExportError
from uniref_deploy.runtime.fileio import make_temp_dir
from uniref_deploy.runtime.graphs import ROPE_INPUT_POSITIONS, dit_io
from uniref_deploy.runtime.manifest import ModelConfig

from .graph_export import DEFAULT_OPSET, _by_position, _summary, dynamic_shapes_for, name_dynamic_axes
from .lean_lora import fuse_bytes, streamed_deltas
from .lora import LoraSpec
from .precision import DTYPES, Float32Island, IOCast
from .qwen_image import QwenImageDitForExport

logger = logging.getLogger(__name__)
Progress = Callable[[str], None]

CHUNK_BYTES = 64 * 1024**2
ALIGNMENT = 4096  # each tensor starts on a page boundary: ONNX Runtime / TensorRT can mmap it
# (numpy dtype name, ONNX TensorProto type, bytes per element)
ST_DTYPES = {"BF16": ("bfloat16", onnx.TensorProto.BFLOAT16, 2), "F16": ("float16", onnx.TensorProto.FLOAT16, 2),
             "F32": ("float32", onnx.TensorProto.FLOAT, 4)}
ONNX_TO_ST = {v[1]: k for k, v in ST_DTYPES.items()}
EXAMPLE_SIZES = {"batch": 2, "img_tokens": 40, "txt_tokens": 7}  # distinct from every static size of the DiT


@dataclass(frozen=True)
class SafetensorsEntry:
    """Where one tensor lives: file, absolute byte range, safetensors dtype, shape."""

    key: str
    file: Path
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: str | os.PathLike) -> dict[str, SafetensorsEntry]:
    """The tensors of one .safetensors file, from its JSON header only (no data is read)."""
    path = Path(path)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    base = 8 + size
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[key] = SafetensorsEntry(key, path, base + begin, base + end, info["dtype"], tuple(info["shape"]))
    return out


def checkpoint_index(transformer_dir: str | os.PathLike) -> dict[str, SafetensorsEntry]:
    """Every tensor of a diffusers transformer folder (sharded with an index json, or single-file)."""
    root = Path(transformer_dir)
    index = sorted(root.glob("*.safetensors.index.json"))
    if index:
        files = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        paths = [root / f for f in files]
    else:
        paths = sorted(root.glob("*.safetensors"))
    if not paths:
        raise ExportError(f"No .safetensors weights in '{root}'.", "lean export streams safetensors checkpoints only.")
    out: dict[str, SafetensorsEntry] = {}
    for p in paths:
        out.update(read_safetensors_header(p))
    return out


def transformer_dir(model_dir: Path) -> Path:
    """``model_dir/transformer`` for a diffusers root, else ``model_dir`` itself (a transformer folder)."""
    return model_dir / "transformer" if (model_dir / "transformer" / "config.json").is_file() else model_dir


def build_meta_dit(transformer_config: dict, dtype: str, keep_fp32: Iterable[str] = ()) -> tuple[torch.nn.Module, dict]:
    """The exportable DiT on the meta device, and {parameter name in that module: checkpoint key}.

    ``keep_fp32`` names submodules (as in ``to_precision``) that become fp32 islands of an fp16 graph.
    """
    import diffusers

    with torch.device("meta"):
        transformer = diffusers.QwenImageTransformer2DModel.from_config(dict(transformer_config))
    transformer = transformer.to(DTYPES[dtype]).eval()
    keys = {id(t): k for k, t in (*transformer.named_parameters(), *transformer.named_buffers())}
    dit = QwenImageDitForExport(transformer).eval()
    if dtype == "fp32":
        module: torch.nn.Module = dit
    else:
        for name in keep_fp32:
            parent_name, _, child = name.rpartition(".")
            parent = dit.get_submodule(parent_name) if parent_name else dit
            layer = getattr(parent, child)
            before = {n: keys[id(t)] for n, t in layer.named_parameters() if id(t) in keys}
            island = Float32Island(layer)
            keys.update({id(t): before[n] for n, t in island.inner.named_parameters() if n in before})
            setattr(parent, child, island)
        module = IOCast(dit, DTYPES[dtype], keep_float32=ROPE_INPUT_POSITIONS).eval()
    names = {n: keys[id(t)] for n, t in (*module.named_parameters(), *module.named_buffers()) if id(t) in keys}
    return module, names


def _example_args(config: ModelConfig) -> tuple:
    inputs, _ = dit_io(config)
    args = []
    for spec in inputs:
        shape = [EXAMPLE_SIZES[d] if isinstance(d, str) else int(d) for d in spec.shape]
        args.append(torch.empty(shape, dtype=getattr(torch, spec.dtype), device="meta"))
    return tuple(args)


def trace_without_weights(module: torch.nn.Module, config: ModelConfig, opset: int = DEFAULT_OPSET):
    """(ONNXProgram, {initializer name: (shape, ONNX dtype)}) of the meta DiT; weights removed from the graph."""
    inputs, outputs = dit_io(config)
    return trace_meta_module(module, _example_args(config), inputs, outputs, opset)


def trace_meta_module(module: torch.nn.Module, args: tuple, inputs, outputs, opset: int = DEFAULT_OPSET):
    """(ONNXProgram, {initializer name: (shape, ONNX dtype)}) of any meta module called with meta ``args``."""
    names = [s.name for s in inputs]
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module, args, None, input_names=names, output_names=[s.name for s in outputs],
                dynamic_shapes=_by_position(module, names, dynamic_shapes_for(inputs)), opset_version=opset,
                dynamo=True, optimize=False, verbose=False,
            )
    except Exception as err:
        raise ExportError(f"torch.onnx.export (meta) failed: {_summary(err)}", "run with -vv for the full trace.") from err
    graph = program.model.graph
    hidden: dict[str, tuple[tuple[int, ...], int]] = {}
    for name, value in graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, torch.Tensor) and raw.device.type == "meta":
            hidden[name] = (tuple(int(d) for d in value.shape), int(value.dtype))
            value.const_value = None  # not a constant for the folder: same as a weight over its size limit
    quiet = logging.getLogger("onnx_ir")  # one "skipped deduplication" warning per hidden weight otherwise
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with _without_multi_output_rewrites():
            program.optimize()
    finally:
        quiet.setLevel(level)
    declared = {}
    for name in list(graph.initializers):
        if name in hidden:
            declared[name] = hidden[name]
            graph.initializers.pop(name)  # the value stays wired to its consumers; declared again as external below
    live = {v.name for node in graph for v in node.inputs if v is not None} | {v.name for v in graph.outputs}
    declared = {k: v for k, v in declared.items() if k in live}
    for name, value in graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if value.const_value is None or (isinstance(raw, torch.Tensor) and raw.device.type == "meta"):
            raise ExportError(f"Initializer '{name}' has no data after the meta export.",
                              "a constant derived from weights cannot be streamed; report this graph.")
    return program, declared


@contextlib.contextmanager
def _without_multi_output_rewrites():
    """Run torch's ONNX optimizer without rewrite rules whose pattern has several output nodes.

    onnxscript matches such rules (today only ``SlicesSplit``: two Slices -> one Split) by trying node pairs
    across the whole graph, which is quadratic: 18 s at 8 full-size blocks, 63 s at 16, ~20 min at 60. Without
    it the optimizer is linear; the graph keeps two Slices where it would have had one Split.
    """
    from onnxscript import rewriter

    rules = rewriter._DEFAULT_REWRITE_RULES
    single = tuple(r for r in rules if len(getattr(getattr(r, "_target_pattern", None), "output_nodes", [0])) == 1)
    rewriter._DEFAULT_REWRITE_RULES = single
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _convert(chunk: bytes, src: str, dst: int) -> bytes:
    """Reinterpret ``chunk`` (safetensors dtype ``src``) as ONNX type ``dst`` (round to nearest even)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    src_np = np.dtype(ST_DTYPES[src][0]) if src != "BF16" else np.dtype(ml_dtypes.bfloat16)
    dst_name = ST_DTYPES[ONNX_TO_ST[dst]][0]
    dst_np = np.dtype(ml_dtypes.bfloat16) if dst_name == "bfloat16" else np.dtype(dst_name)
    return np.frombuffer(chunk, dtype=src_np).astype(dst_np).tobytes()


def stream_tensors(plan: list[tuple[str, SafetensorsEntry, int]], data_path: Path, consume: bool = False,
                   progress: Progress | None = None, deltas: Mapping[str, list] | None = None) -> dict[str, tuple[int, int]]:
    """Copy each (initializer, checkpoint entry, ONNX dtype) into ``data_path``; {initializer: (offset, length)}.

    Reads each shard sequentially in ``CHUNK_BYTES`` pieces; with ``consume`` a shard is deleted as soon as its last
    tensor has been copied (the disk then holds the data file plus at most one shard's worth of extra bytes).
    A tensor whose checkpoint key is in ``deltas`` (export/lean_lora.py) is read whole and written LoRA-fused.
    """
    deltas = deltas or {}
    plan = sorted(plan, key=lambda p: (str(p[1].file), p[1].start))
    last_use = {str(e.file): i for i, (_, e, _) in enumerate(plan)}
    locations: dict[str, tuple[int, int]] = {}
    done_bytes = 0
    total = sum(e.nbytes for _, e, _ in plan)
    t0 = time.perf_counter()
    with open(data_path, "wb") as out:
        src, src_name = None, None
        try:
            for i, (name, entry, dst) in enumerate(plan):
                if src_name != str(entry.file):
                    if src is not None:
                        src.close()
                    src, src_name = open(entry.file, "rb"), str(entry.file)  # noqa: SIM115
                pos = out.tell()
                pad = -pos % ALIGNMENT
                if pad:
                    out.write(b"\0" * pad)
                    pos += pad
                src.seek(entry.start)
                remaining = entry.nbytes
                item = ST_DTYPES[entry.dtype][2]
                if entry.key in deltas:
                    out.write(fuse_bytes(_read_exactly(src, entry), entry.dtype, entry.shape, dst, deltas[entry.key]))
                    remaining = 0
                elif ONNX_TO_ST[dst] == entry.dtype:
                    out.flush()
                    remaining -= _kernel_copy(src, out, entry.start, remaining)
                    src.seek(entry.start + entry.nbytes - remaining)
                while remaining:
                    n = min(remaining, CHUNK_BYTES - CHUNK_BYTES % item)
                    chunk = src.read(n)
                    if len(chunk) != n:
                        raise ExportError(f"'{entry.file.name}' is truncated at tensor '{entry.key}'.")
                    out.write(chunk if ONNX_TO_ST[dst] == entry.dtype else _convert(chunk, entry.dtype, dst))
                    remaining -= n
                locations[name] = (pos, out.tell() - pos)
                done_bytes += entry.nbytes
                if last_use[src_name] == i:
                    src.close()
                    src, src_name = None, None
                    if consume:
                        out.flush()
                        os.unlink(entry.file)
                    if progress:
                        rate = done_bytes / max(time.perf_counter() - t0, 1e-9) / 1e9
                        progress(f"lean export: streamed {entry.file.name} ({done_bytes / 1e9:.1f}/{total / 1e9:.1f} "
                                 f"GB, {rate:.2f} GB/s){' and deleted it' if consume else ''}")
        finally:
            if src is not None:
                src.close()
    return locations


def _read_exactly(src, entry: SafetensorsEntry) -> bytearray:
    raw = bytearray(entry.nbytes)
    if src.readinto(raw) != entry.nbytes:
        raise ExportError(f"'{entry.file.name}' is truncated at tensor '{entry.key}'.")
    return raw


def _kernel_copy(src, out, start: int, count: int) -> int:
    """Copy ``count`` bytes from ``src`` at ``start`` to the end of ``out`` in the kernel; bytes copied (0: use read)."""
    copy = getattr(os, "copy_file_range", None)
    done = 0
    try:
        while copy is not None and done < count:
            n = copy(src.fileno(), out.fileno(), min(count - done, CHUNK_BYTES), start + done)
            if n <= 0:
                break
            done += n
    except OSError:
        pass
    out.seek(0, os.SEEK_END)
    return done


def _external_initializer(name: str, shape: tuple[int, ...], dtype: int, location: str, offset: int,
                          length: int) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=dtype, dims=list(shape))
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    return t


def save_lean_graph(model: onnx.ModelProto, io: tuple[Sequence, Sequence], tmp_dir: Path, out_path: Path,
                    location: str, check: bool = True) -> None:
    """Name the dynamic axes, save the graph beside its streamed data in ``tmp_dir``, check it (full shape
    inference), then move data and graph into place: data first, so a graph never points at nothing.

    Raises:
        ExportError: the ONNX checker rejects the graph.
    """
    inputs, outputs = io
    name_dynamic_axes(model, [*inputs, *outputs])
    onnx.save_model(model, str(tmp_dir / out_path.name))
    if check:
        try:
            onnx.checker.check_model(str(tmp_dir / out_path.name), full_check=True)
        except Exception as err:
            raise ExportError(f"ONNX checker rejected the lean '{out_path.name}': {str(err).splitlines()[0]}") from err
    os.replace(tmp_dir / location, out_path.parent / location)
    os.replace(tmp_dir / out_path.name, out_path)


def stream_plan(declared: Mapping[str, tuple[tuple[int, ...], int]], keys: Mapping[str, str | None],
                ckpt: Mapping[str, SafetensorsEntry], what: str) -> list[tuple[str, SafetensorsEntry, int]]:
    """(initializer, checkpoint entry, ONNX dtype) for each declared initializer, in graph order.

    ``keys`` maps an initializer name to its checkpoint key (None: no key).

    Raises:
        ExportError: an initializer has no checkpoint tensor, or its shape or dtype does not fit (first three named).
    """
    plan, problems = [], []
    for name, (shape, onnx_dtype) in declared.items():
        key = keys.get(name)
        entry = ckpt.get(key) if key else None
        if entry is None:
            problems.append(f"'{name}' (checkpoint key {key!r}) is not in the checkpoint")
        elif entry.shape != shape:
            problems.append(f"'{key}' has shape {entry.shape} in the checkpoint, {shape} in the graph")
        elif entry.dtype not in ST_DTYPES or onnx_dtype not in ONNX_TO_ST:
            problems.append(f"'{key}': unsupported dtype {entry.dtype} -> {onnx_dtype}")
        else:
            plan.append((name, entry, onnx_dtype))
    if problems:
        raise ExportError(f"{what} cannot map {len(problems)} initializer(s): {'; '.join(problems[:3])}.",
                          "is the checkpoint complete and does its config match?")
    return plan


def export_dit_lean(model_dir: str | os.PathLike, out_path: str | os.PathLike, config: ModelConfig | None = None,
                    dtype: str = "bf16", progress: Progress | None = None, *, keep_fp32: Iterable[str] = (),
                    opset: int = DEFAULT_OPSET, consume_shards: bool = False, check: bool = True,
                    loras: Sequence[LoraSpec] = (), deltas: Mapping[str, list] | None = None) -> dict:
    """Export the DiT of ``model_dir`` (diffusers root or its transformer/ folder) to ``out_path`` + ``.data``.

    Peak memory is the traced graph plus one 64 MiB chunk, whatever the model size. With ``consume_shards`` the
    checkpoint's shards are DELETED as they are streamed (for disks that cannot hold both copies). ``loras`` are
    read once up front and fused into their layers as those are streamed (float32 math, then the graph's dtype);
    ``deltas`` (from ``streamed_deltas``, LoRAs already read) replaces ``loras``.

    Returns: stats (seconds per phase, initializer count and bytes, file sizes, peak RSS of this process, and
    ``initializer_keys``: initializer name -> checkpoint key).

    Raises:
        ExportError: tracing failed, or an initializer has no checkpoint tensor of the right shape.
        InputError: a LoRA is unreadable or does not fit this transformer (before anything is written).
    """
    say = progress or (lambda msg: logger.info(msg))
    if dtype not in DTYPES:
        raise ExportError(f"Unknown dtype '{dtype}'.", f"use {', '.join(DTYPES)}.")
    model_dir, out_path = Path(model_dir), Path(out_path)
    tdir = transformer_dir(model_dir)
    if config is None:
        config = ModelConfig("qwen-image", json.loads((tdir / "config.json").read_text()), {}, {})
    transformer_config = {k: v for k, v in config.transformer.items() if not k.startswith("_")}
    stats: dict = {"dtype": dtype, "opset": opset}
    t0 = time.perf_counter()
    if deltas is None:
        deltas = streamed_deltas(transformer_config, loras)
    if deltas:
        say(f"lean export: LoRA deltas for {len(deltas)} layer(s), fused while streaming")

    say("lean export: building the DiT on the meta device and tracing it")
    module, param_keys = build_meta_dit(transformer_config, dtype, keep_fp32)
    program, declared = trace_without_weights(module, config, opset)
    stats["trace_seconds"] = round(time.perf_counter() - t0, 2)
    stats["parameters"] = sum(p.numel() for p in module.parameters())
    del module

    ckpt = checkpoint_index(tdir)
    plan = stream_plan(declared, param_keys, ckpt, "Lean export")
    stats["initializers"] = len(plan)
    stats["lora_layers"] = sum(1 for _, e, _ in plan if e.key in deltas)
    stats["unused_checkpoint_tensors"] = len(ckpt) - len(plan)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = make_temp_dir(out_path)
    try:
        location = out_path.name + ".data"
        t1 = time.perf_counter()
        say(f"lean export: streaming {len(plan)} tensors into {location}")
        locations = stream_tensors(plan, tmp_dir / location, consume=consume_shards, progress=say, deltas=deltas)
        stats["stream_seconds"] = round(time.perf_counter() - t1, 2)

        import onnx_ir as ir

        model = ir.to_proto(program.model)
        del program
        for name, (shape, onnx_dtype) in declared.items():
            model.graph.initializer.append(_external_initializer(name, shape, onnx_dtype, location, *locations[name]))
        save_lean_graph(model, dit_io(config), tmp_dir, out_path, location, check)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    stats.update(
        seconds=round(time.perf_counter() - t0, 2),
        graph_bytes=out_path.stat().st_size,
        data_bytes=(out_path.parent / location).stat().st_size,
        streamed_bytes=sum(e.nbytes for _, e, _ in plan),
        peak_rss_bytes=peak_rss_bytes(),
        consumed_shards=consume_shards,
        initializer_keys={name: e.key for name, e, _ in plan},
    )
    say(f"lean export: {out_path} ({stats['data_bytes'] / 1e9:.2f} GB of weights) in {stats['seconds']} s")
    return stats


def peak_rss_bytes(children: bool = False) -> int:
    """Peak resident set size of this process (or of its waited-for children) in bytes (Linux: ru_maxrss in KiB)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return int(usage.ru_maxrss) * 1024
