"""LoRA swap for lean artifacts: the DiT's external data is patched layer by layer, bases read from the checkpoint.

A lean export keeps no copy of the un-fused weights (for the 20B model that would be tens of GB); its
``lora/source.json`` names the checkpoint it streamed (and its shards' sizes and mtimes). A swap

    1. copies each DiT graph's ``.data`` file beside itself (the graph proto is unchanged: same offsets);
    2. per affected layer: reads the base weight from the checkpoint, fuses the new LoRAs in float32
       (export/lora.py's ``fused_weight``, as the export did), and writes it at that initializer's byte range
       in each copy, in the initializer's own dtype;
    3. renames the copies over the live files and records which layers now hold a LoRA.

Peak memory is one layer; the result is byte-identical to a fresh lean export with the new LoRAs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from uniref_deploy.runtime.errors import ManifestError

from .lean import checkpoint_index
from .lean_lora import LEAN_SOURCE_FILE, ONNX_TORCH, shard_fingerprint, write_lean_source
from .lean_reference import _ShardReader
from .lora import fused_weight


def read_lean_source(art: Path) -> dict | None:
    """``lora/source.json`` of a lean artifact, or None (a regular export keeps its bases in the artifact)."""
    path = Path(art) / LEAN_SOURCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_reader(source: Mapping) -> _ShardReader:
    """A reader of the base weights, once the checkpoint is known to be the one the export streamed.

    Raises:
        ManifestError: the shards were consumed by the export, moved, or changed since.
    """
    root = Path(source["checkpoint"])
    if source.get("consumed"):
        raise ManifestError(f"This lean artifact was exported with --consume-shards: the base weights in '{root}' are "
                            "gone, so its LoRAs cannot be swapped.", "re-export from the checkpoint with --lora.")
    if shard_fingerprint(root) != source.get("shards"):
        raise ManifestError(f"The checkpoint '{root}' this lean artifact was streamed from is missing or changed; "
                            "it holds the base weights a swap needs.", "restore it there, or re-export with --lora.")
    return _ShardReader(checkpoint_index(root))


def swap_lean(art: Path, index: Mapping[str, Mapping[str, list]], source: Mapping, targets: Sequence[str],
              deltas: Mapping[str, list], say: Callable[[str], None]) -> None:
    """Rewrite ``targets`` (module names) in every graph of ``index`` as base + ``deltas[module]``; see the module
    docstring. Nothing live changes until every copy is written."""
    reader = checkpoint_reader(source)
    layouts = {rel: _layout(art / rel) for rel in index}
    copies = {rel: _copy_path(art, rel) for rel in index}
    try:
        for rel, copy in copies.items():
            say(f"lora: copying {rel}.data to patch {sum(index[rel][m][0] is not None for m in targets)} layer(s)")
            shutil.copyfile(art / (rel + ".data"), copy)
        files = {rel: open(copy, "r+b") for rel, copy in copies.items()}  # noqa: SIM115
        try:
            for module in targets:
                w = fused_weight(reader.tensor(f"{module}.weight"), deltas.get(module, []))
                for rel, f in files.items():
                    name = index[rel][module][0]
                    if name is None:
                        continue
                    offset, length, dtype = layouts[rel][name]
                    data = w.to(ONNX_TORCH[dtype]).contiguous().reshape(-1).view(torch.uint8).numpy()
                    if data.nbytes != length:
                        raise ManifestError(f"{rel}: initializer '{name}' holds {length} bytes, the fused weight "
                                            f"{data.nbytes}.", "the artifact does not match its lora/index.json; "
                                            "re-export.")
                    f.seek(offset)
                    f.write(memoryview(data))
        finally:
            for f in files.values():
                f.close()
        for rel, copy in copies.items():
            os.replace(copy, art / (rel + ".data"))
    finally:
        for copy in copies.values():
            copy.unlink(missing_ok=True)
    write_lean_source(art, {**source, "fused": sorted(m for m in targets if deltas.get(m))})


def _copy_path(art: Path, rel: str) -> Path:
    path = art / (rel + ".data")
    return path.with_name(f".{path.name}.swap")


def _layout(path: Path) -> dict[str, tuple[int, int, int]]:
    """{initializer: (offset, length, ONNX dtype)} of the graph's external initializers (the proto only)."""
    import onnx

    out = {}
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if t.data_location == onnx.TensorProto.EXTERNAL and ext.get("location") == path.name + ".data":
            out[t.name] = (int(ext.get("offset", 0)), int(ext["length"]), t.data_type)
    return out
