"""The exporter's text-encoder step: references, per-precision graph jobs and the manifest's ``text`` record.

``export/exporter.py`` calls ``load_text`` once and ``text_jobs`` per precision (fp32, fp16); each job is written,
linted and validated like the DiT's. fp16 graphs keep their RMSNorms, the rotation and the softmax in float32,
plus any layer whose measured activations come near fp16's range (``export/precision.py``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.encoder_io import (
    ENCODER_FLOAT32_INPUTS,
    TEXT_DIR,
    TEXT_ENCODER,
    TEXT_VISION,
    VISION_FLOAT32_INPUTS,
    EncoderDims,
    max_text_len,
    most_patches_at_area,
    text_graph_io,
    vision_max_patches,
)
from uniref_deploy.runtime.pipeline_classes import PIPELINE_CLASSES

from .graph_export import export_graph
from .precision import (
    DTYPES,
    FP16_SAFETY,
    IOCast,
    fp16_overflow_layers,
    measure_activation_ranges,
    to_precision,
)
from .text_encoder import fp16_text_islands, load_text_encoder, text_modules
from .text_files import write_text_files
from .text_samples import (
    ENCODER_EXAMPLE_LEN,
    VISION_EXAMPLE_GRIDS,
    VISION_SMOKE_GRIDS,
    encoder_feeds,
    vision_feeds,
)

TEXT_PRECISIONS = ("fp32", "fp16")
OPT_CONDITIONING_TOKENS = 256  # the engine profiles' opt conditioning length (as the DiT's opt_text_tokens)
FLOAT32_INPUTS = {TEXT_VISION: VISION_FLOAT32_INPUTS, TEXT_ENCODER: ENCODER_FLOAT32_INPUTS}


@dataclass
class TextReferences:
    """The loaded encoder, its two fp32 wrappers, their sample feeds and the text encoder's config dict."""

    model: torch.nn.Module
    modules: dict[str, torch.nn.Module]
    config: dict
    smoke: dict[str, list[tuple[str, dict]]] = field(default_factory=dict)
    full: dict[str, list[tuple[str, dict]]] = field(default_factory=dict)
    examples: dict[str, dict] = field(default_factory=dict)


@dataclass
class LeanText:
    """A lean export's prompt encoder: never loaded; each graph is streamed from the checkpoint (lean_text.py)."""

    model_dir: Path


def load_text(model_dir: Path) -> TextReferences:
    """Load ``model_dir/text_encoder`` in fp32 and build the wrappers and their samples."""
    model = load_text_encoder(model_dir / "text_encoder")
    vision, encoder = text_modules(model)
    config = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    visual = model.model.visual
    refs = TextReferences(model, {TEXT_VISION: vision, TEXT_ENCODER: encoder}, config)
    refs.examples = {TEXT_VISION: vision_feeds(visual, VISION_EXAMPLE_GRIDS, 0),
                     TEXT_ENCODER: encoder_feeds(model, ENCODER_EXAMPLE_LEN, 0)}
    refs.smoke = {
        TEXT_VISION: [(f"smoke {len(g)} image(s) {sum(t * h * w for t, h, w in g)} patches", vision_feeds(visual, g, i))
                      for i, g in enumerate(VISION_SMOKE_GRIDS)],
        TEXT_ENCODER: [(f"smoke L={n} images={len(g)}", encoder_feeds(model, n, i, g))
                       for i, (n, g) in enumerate(((5, ()), (40, ((1, 4, 4),))))],
    }
    full_grids = (((1, 8, 12),), ((1, 4, 4), (1, 10, 6), (1, 6, 10)))
    refs.full = {
        TEXT_VISION: [(f"{len(g)} image(s) {sum(t * h * w for t, h, w in g)} patches", vision_feeds(visual, g, 10 + i))
                      for i, g in enumerate(full_grids)],
        TEXT_ENCODER: [(f"L={n} images={len(g)}", encoder_feeds(model, n, 10 + i, g))
                       for i, (n, g) in enumerate(((97, full_grids[0]), (160, full_grids[1])))],
    }
    return refs


def _args(module: torch.nn.Module, name: str, config: dict, feeds: dict) -> tuple:
    names = [s.name for s in text_graph_io(name, config)[0]]
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names)


def at_precision(refs: TextReferences, name: str, precision: str, safety: float = FP16_SAFETY) -> tuple[torch.nn.Module, list[str]]:
    """The graph module at ``precision`` and the layers kept float32 (norms + measured overflow layers)."""
    module = refs.modules[name]
    if precision == "fp32":
        return module, []
    probe = [_args(module, name, refs.config, f) for _, f in refs.smoke[name] + refs.full[name]]
    measured = fp16_overflow_layers(module, measure_activation_ranges(module, probe), safety)
    keep = sorted(set(fp16_text_islands(module)) | set(measured))
    inner = to_precision(module, precision, keep)
    return IOCast(inner, DTYPES[precision], keep_float32=FLOAT32_INPUTS[name]).eval(), keep


def _write(module: torch.nn.Module, args: tuple, name: str, config: dict, opset: int, path: Path) -> dict:
    inputs, outputs = text_graph_io(name, config)
    with torch.no_grad():
        export_graph(module, args, path, inputs, outputs, opset)
    return {}


def text_jobs(refs: TextReferences | LeanText, precision: str, opset: int, validate: bool, safety: float = FP16_SAFETY) -> list[dict]:
    """Keyword arguments of one ``GraphJob`` per text graph at ``precision`` (none for other precisions).

    Lean: the graphs are streamed and carry no samples (a 7B graph does not fit ONNX Runtime here; the streamed
    export is tested equal to the regular one on the presets).
    """
    if precision not in TEXT_PRECISIONS:
        return []
    if isinstance(refs, LeanText):
        config = json.loads((refs.model_dir / "text_encoder" / "config.json").read_text())
        return [dict(name=name, precision=precision, reference=torch.nn.Identity(), samples=[], smoke=[],
                     write=functools.partial(_write_lean, refs.model_dir, name, precision, opset),
                     io=text_graph_io(name, config)) for name in (TEXT_VISION, TEXT_ENCODER)]
    jobs = []
    for name in (TEXT_VISION, TEXT_ENCODER):
        module, keep = at_precision(refs, name, precision, safety)
        args = _args(module, name, refs.config, refs.examples[name])
        jobs.append(dict(name=name, precision=precision, reference=refs.modules[name],
                         write=functools.partial(_write, module, args, name, refs.config, opset),
                         samples=refs.full[name] if validate else [], smoke=refs.smoke[name],
                         io=text_graph_io(name, refs.config),
                         info={"fp32_layers": keep} if precision != "fp32" else {}))
    return jobs


def _write_lean(model_dir: Path, name: str, precision: str, opset: int, path: Path) -> dict:
    from .lean_text import export_text_graph_lean

    stats = export_text_graph_lean(model_dir, name, path, precision, opset=opset)
    return {"lean": {k: stats[k] for k in ("trace_seconds", "stream_seconds", "initializers", "peak_rss_bytes")},
            "fp32_layers": stats["fp32_layers"], "validation_note": "lean: not run in ONNX Runtime"}


def text_limits(pipeline_class: str, budgets: tuple[Budget, ...], model_dir: Path) -> dict:
    """The limits of the manifest's ``text`` record (formulas: ``runtime/encoder_io.py``): ``vision_max_patches``
    and ``max_text_len`` (largest budget), per-budget ``vision_patches`` and the engine profiles' opt sizes."""
    pipeline = PIPELINE_CLASSES[pipeline_class]
    processor = processor_config(model_dir)
    dims = EncoderDims.from_config(json.loads((model_dir / "text_encoder" / "config.json").read_text()))
    per_budget = {str(b.pixels): vision_max_patches(pipeline, b, processor) for b in budgets}
    one = most_patches_at_area(pipeline.condition_area or max(budgets).pixels, processor)
    return {"vision_max_patches": max(per_budget.values()), "max_text_len": max_text_len(pipeline),
            "vision_patches": per_budget, "vision_opt_patches": min(one, max(per_budget.values())),
            "opt_text_len": pipeline.drop_tokens + OPT_CONDITIONING_TOKENS, "merge_unit": dims.merge_unit}


def processor_config(folder: Path) -> dict:
    """The image processor's settings (min/max pixels, patch and merge size) from a model or ``ART/text`` folder."""
    for path in (folder / "processor" / "preprocessor_config.json", folder / "processor" / "processor_config.json",
                 folder / "preprocessor_config.json", folder / "processor_config.json"):
        if path.is_file():
            data = json.loads(path.read_text())
            data = data.get("image_processor", data)
            size = data.get("size") or {}
            return {**data, "min_pixels": data.get("min_pixels", size.get("shortest_edge", 56 * 56)),
                    "max_pixels": data.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))}
    return {}


def write_text_record(refs: TextReferences | LeanText, model_dir: Path, art: Path, fp16: bool, limits: dict) -> dict:
    """Write ``art/text/`` (the table from the loaded encoder, or streamed from the checkpoint); the ``text``
    record of the manifest."""
    if isinstance(refs, LeanText):
        from .lean_text import embedding_entry, embedding_rows

        entry = embedding_entry(model_dir)
        files = write_text_files(model_dir, art, embedding_rows(entry), entry.shape, fp16)
        return {"dir": TEXT_DIR, "files": files, **limits}
    table = refs.model.model.language_model.embed_tokens.weight

    def rows(start: int, stop: int) -> np.ndarray:
        return table[start:stop].detach().float().numpy()

    files = write_text_files(model_dir, art, rows, tuple(table.shape), fp16)
    return {"dir": TEXT_DIR, "files": files, **limits}
