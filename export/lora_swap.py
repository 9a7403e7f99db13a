"""``uniref-deploy lora ART``: swap the LoRAs fused in exported DiT graphs without re-tracing.

Export writes ``lora/index.json`` (module -> initializer name and layout in each portable DiT graph, found by
content) and ``lora/base.safetensors`` (the un-fused weights of the layers the fused LoRAs touch). A swap
recomputes only the affected initializers as base + Σ scale·(B·A) in the order diffusers' ``fuse_lora`` applies
them, rewrites the graphs atomically and updates their hashes. Derived artifacts: the ONNX Runtime-fused DiT is
rebuilt from the swapped portable graph (its fusions are structural); refittable TensorRT engines of a swapped
graph are refitted where TensorRT runs (engines/refit.py); other DiT engines and the DiT graphs outside the index
(FP8, bf16) are dropped from the manifest as stale (rebuild with ``build`` / ``calibrate`` / ``export``). The files
stay on disk until then. A lean export has no base file and its graphs may be too large to
load: its swap patches the external data layer by layer with bases read from the checkpoint (export/lean_swap.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from uniref_deploy.runtime.errors import ManifestError
from uniref_deploy.runtime.fileio import atomic_write_text, sha256_file
from uniref_deploy.runtime.graphs import DIT
from uniref_deploy.runtime.locking import writes_artifacts
from uniref_deploy.runtime.manifest import ORT_VARIANT, Manifest, StageRecord

from .lean_swap import read_lean_source, swap_lean
from .lora import BASE_FILE, LoraSpec, fused_weight, lora_pairs, read_checked, save_lora_base
from .onnx_files import data_file, external_data_record, save_graph

INDEX_FILE = "lora/index.json"
NP_DTYPES = {1: np.float32, 10: np.float16}  # ONNX TensorProto FLOAT, FLOAT16


def write_lora_index(art: Path, dit, graph_files: Sequence[str]) -> None:
    """Find each linear layer of ``dit`` (fused weights, as exported) among each graph's initializers by content."""
    import onnx
    import torch

    linears = {n.removeprefix("transformer."): m.weight.detach().float().numpy()
               for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}
    index: dict[str, dict] = {}
    for rel in graph_files:
        model = onnx.load(str(art / rel))
        by_hash = {hashlib.sha256(_array(t).tobytes()).hexdigest(): t.name
                   for t in model.graph.initializer if t.data_type in NP_DTYPES}
        found: dict[str, list] = {n: [None, False, list(w.shape)] for n, w in linears.items()}  # None: not in graph
        for name, w in linears.items():
            for dtype in (np.float32, np.float16):
                for transposed, arr in ((False, w), (True, w.T)):
                    hit = by_hash.get(hashlib.sha256(np.ascontiguousarray(arr, dtype=dtype).tobytes()).hexdigest())
                    if hit and found[name][0] is None:
                        found[name] = [hit, transposed, list(w.shape)]
        index[rel] = found
    atomic_write_text(art / INDEX_FILE, json.dumps(index, indent=1))


@writes_artifacts("lora", arg="art")
def swap_loras(art: str | Path, specs: Sequence[LoraSpec], progress: Callable[[str], None] | None = None) -> Manifest:
    """Replace the fused LoRAs of ``art``'s DiT graphs by ``specs`` (empty: back to the base weights).

    Raises:
        InputError: a LoRA is unreadable, for another model, or has a non-finite scale (nothing is written).
        ManifestError: the artifact has no LoRA index (exported before this feature), or it is lean and the
            checkpoint holding its base weights is gone or changed (export/lean_swap.py).
        ArtifactLockedError: another write stage holds ART's lock.
    """
    art, say, t0 = Path(art), progress or (lambda msg: None), time.perf_counter()
    manifest = Manifest.load(art)
    if not (art / INDEX_FILE).is_file():
        raise ManifestError(f"'{art}' has no {INDEX_FILE}: its DiT graphs cannot take a LoRA swap.",
                            "re-export with this version (`uniref-deploy export MODEL --lora ...`).")
    index = json.loads((art / INDEX_FILE).read_text())
    fp32_rel = next(iter(index))  # the fp32 graph comes first: bases are read from it exactly
    shapes = {m: tuple(shape) for m, (_, _, shape) in index[fp32_rel].items()}
    states = read_checked(specs, shapes)
    lean = read_lean_source(art)
    if lean is not None:  # bases from the checkpoint, the graphs' external data patched layer by layer
        deltas: dict[str, list] = {}
        for spec, state in zip(specs, states, strict=True):
            for m, (a, b) in lora_pairs(state).items():
                deltas.setdefault(m, []).append((a, b, spec.scale))
        targets = [m for m in sorted(set(deltas) | set(lean["fused"])) if any(e[m][0] for e in index.values())]
        swap_lean(art, index, lean, targets, deltas, say)
        for rel in index:
            manifest = _rehash(art, manifest, rel)
    else:
        targets = _swap_in_memory(art, index, fp32_rel, specs, states, say)
        for rel in index:
            manifest = _rehash(art, manifest, rel)
    changed = {rel: [e[m][0] for m in targets if e[m][0] is not None] for rel, e in index.items()}
    engines_before = [e.file for e in manifest.engines if e.graph == DIT]
    manifest = _derived(art, manifest, changed, say)
    refitted = [e.file for e in manifest.engines if e.graph == DIT]
    manifest = manifest.with_stage(StageRecord(
        stage="lora", inputs_sha256=hashlib.sha256(json.dumps([s.record() for s in specs]).encode()).hexdigest(),
        settings={"loras": [s.record() for s in specs]}, seconds=round(time.perf_counter() - t0, 2),
        results={"layers": len(targets), "graphs": list(index), "engines_refitted": refitted,
                 "engines_stale": [f for f in engines_before if f not in refitted]}))
    manifest.save(art)
    return manifest


def _swap_in_memory(art: Path, index: dict, fp32_rel: str, specs: Sequence[LoraSpec], states: list,
                    say: Callable[[str], None]) -> list[str]:
    """Rewrite the graphs of a regular export (bases from ``lora/base.safetensors`` or the fp32 graph); targets."""
    import onnx

    inits = {t.name: t for t in onnx.load(str(art / fp32_rel)).graph.initializer}
    base = _load_base(art)
    targets = sorted({m for s in states for m in lora_pairs(s)} | set(base))
    targets = [m for m in targets if index[fp32_rel][m][0] is not None]  # else pruned from the graph (unused)
    bases = {m: base[m] if m in base else _weight(inits, index[fp32_rel][m]) for m in targets}
    new = {m: _fused(bases[m], [(s, lora_pairs(st).get(m)) for s, st in zip(specs, states, strict=True)])
           for m in targets}
    for rel, entries in index.items():
        values = {entries[m][0]: (new[m], entries[m][1]) for m in targets if entries[m][0] is not None}
        say(f"lora: rewriting {len(values)} initializer(s) of {rel}")
        _rewrite(art / rel, values)
    save_lora_base(art, {m: _torch(bases[m]) for m in targets if any(m in lora_pairs(s) for s in states)})
    return targets


def _load_base(art: Path) -> dict[str, np.ndarray]:
    path = art / BASE_FILE
    if not path.is_file():
        return {}
    from safetensors.numpy import load_file

    return load_file(str(path))


def _torch(arr: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _array(t) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


def _weight(inits: dict, entry: list) -> np.ndarray:
    arr = _array(inits[entry[0]]).astype(np.float32)
    return arr.T if entry[1] else arr


def _fused(base: np.ndarray, loras: list) -> np.ndarray:
    """base + scale·(B·A) per LoRA in order, in float32 torch math as PEFT's merge does."""
    import torch

    deltas = [(pair[0], pair[1], spec.scale) for spec, pair in loras if pair is not None]
    return fused_weight(torch.from_numpy(np.array(base, dtype=np.float32)), deltas).numpy()


def _rewrite(path: Path, values: dict[str, tuple[np.ndarray, bool]]) -> None:
    """Replace the named initializers (at their own dtype and layout) and save the graph atomically."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name in values:
            arr, transposed = values[t.name]
            arr = np.ascontiguousarray(arr.T if transposed else arr, dtype=NP_DTYPES[t.data_type])
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    save_graph(model, path, external=data_file(path).is_file())


def _rehash(art: Path, manifest: Manifest, rel: str) -> Manifest:
    for g in manifest.graphs:
        if g.file == rel:
            info = {**g.info, **external_data_record(art, rel)[1]}
            return manifest.with_graph(dataclasses.replace(g, sha256=sha256_file(art / rel), info=info))
    return manifest


def _derived(art: Path, manifest: Manifest, changed: dict[str, list[str]], say: Callable[[str], None]) -> Manifest:
    """Rebuild the ORT-fused DiT; refit refittable DiT engines of swapped graphs (TensorRT present); drop the other
    DiT engines and the DiT graphs not swapped (FP8, bf16) as stale."""
    from .ort_fusions import fuse_for_ort

    swapped = set(changed)
    for g in manifest.graphs:
        if g.name == DIT and g.variant == ORT_VARIANT:
            src = manifest.graph(DIT, g.precision)
            say(f"lora: rebuilding {g.file} from {src.file} (ONNX Runtime fusions)")
            fuse_for_ort(art / src.file, art / g.file, [*src.inputs, *src.outputs],
                         int(manifest.model.transformer["num_attention_heads"]))
            manifest = manifest.with_graph(dataclasses.replace(g, sha256=sha256_file(art / g.file),
                                                               info={**g.info, "rebuilt_by": "lora"}))
        elif g.name == DIT and g.file not in swapped:
            say(f"lora: {g.file} is stale (old weights); dropped: re-run `uniref-deploy calibrate` (fp8) or `export`")
            manifest = manifest.without_graph(g.key)
    return _engines(art, manifest, changed, say)


def _engines(art: Path, manifest: Manifest, changed: dict[str, list[str]], say: Callable[[str], None]) -> Manifest:
    """Refit each refittable DiT engine built from a swapped graph; drop (as stale) every other DiT engine."""
    from uniref_deploy.engines.build import check_build_environment
    from uniref_deploy.engines.refit import refit_engine, update_saved_plan
    from uniref_deploy.runtime.errors import UnirefError

    dit = [e for e in manifest.engines if e.graph == DIT]
    refittable = [e for e in dit if e.provenance.get("refittable") and e.provenance.get("onnx_file") in changed]
    reason = check_build_environment() if refittable else None
    refitted = []
    for e in refittable:
        if reason is not None:
            say(f"lora: {e.file} is refittable but cannot be refitted here: {reason}")
            continue
        rel = e.provenance["onnx_file"]
        try:
            new = refit_engine(art, e, rel, sha256_file(art / rel), changed[rel])
        except UnirefError as err:
            say(f"lora: refitting {e.file} failed: {err.message}")
            continue
        say(f"lora: refitted {e.file} with {new.provenance['refit']['weights']} weight(s) of {rel} through TensorRT's "
            f"Refitter in {new.provenance['refit']['seconds']:.1f} s")
        refitted.append(new)
    done = {e.file for e in refitted}
    stale = [e for e in dit if e.file not in done]
    if stale:
        say(f"lora: {len(stale)} DiT engine(s) are stale (old weights): {', '.join(e.file for e in stale)}; dropped "
            "from the manifest: rebuild with `uniref-deploy build` (`--refittable` lets the next swap refit them)")
    manifest = dataclasses.replace(manifest, engines=tuple(e for e in manifest.engines if e.graph != DIT or e.file in done))
    for e in refitted:
        manifest = manifest.with_engine(e)
    if refitted:
        update_saved_plan(art, refitted)
    return manifest
