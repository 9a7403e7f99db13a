"""The export stage: diffusers folder -> ONNX graphs (DiT, VAE encoder, VAE decoder) + manifest + reports.

``export_onnx(model_dir, art_dir, ExportOptions(...))`` exports every requested precision, lints each graph for
TensorRT, validates it against torch with ONNX Runtime, and records everything in ``ART/manifest.json``. A re-run
whose inputs (model configs and weight fingerprints, options, tool versions) hash the same is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from uniref_deploy.runtime.errors import ExportError, ManifestError
from uniref_deploy.runtime.fileio import atomic_write_text, sha256_file, sha256_json
from uniref_deploy.runtime.graphs import DIT, VAE_DECODER, VAE_ENCODER, graph_io
from uniref_deploy.runtime.manifest import (
    ORT_VARIANT,
    GraphSpec,
    Manifest,
    ModelConfig,
    StageRecord,
    TensorSpec,
)
from uniref_deploy.runtime.packing import budget_pixels
from uniref_deploy.runtime.rope import RopeCache, RopeConfig
from uniref_deploy.runtime.tiling import DEFAULT_STRIDE, DEFAULT_TILE, TILING_KEY, VaeTiling

from .graph_export import DEFAULT_OPSET, export_graph
from .ort_fusions import contrib_ops, fuse_for_ort, ort_file
from .precision import FP16_SAFETY, IOCast, fp16_overflow_layers, measure_activation_ranges, to_precision
from .qwen_image import QwenImageDitForExport, VaeDecoderForExport, VaeEncoderForExport
from .samples import dit_sample, vae_decoder_samples, vae_encoder_samples, validation_layouts
from .trt_lint import lint_model
from .validate import FP32_TOLERANCE, ValidationRow, format_table, validate_graph

logger = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "bf16")
VAE_PRECISIONS = ("fp32", "fp16")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    """Args:
    budgets: bucket sides to record and validate (1024, 1536, 2048).
    dtypes: graph precisions to export ("fp32" always comes first: it is the reference).
    opset: ONNX opset (>= 17).
    validate: run the ONNX Runtime vs torch validation.
    validation_target_area: target pixel cap for validation layouts above 1024² (memory bound, see samples.py).
    fp16_safety: layers whose measured |activation| exceeds 65504 / fp16_safety stay fp32 in the fp16 graph.
    force: export even if the inputs are unchanged.
    ort_fusions: also write ``onnx/dit.ort.onnx``, the fp32 DiT with ONNX Runtime contrib-op fusions (validated
        like the portable graph; ONNX Runtime backends prefer it, TensorRT never uses it).
    pipeline_class: serve the model as this diffusers class (None: ``model_index.json``'s); recorded.
    text_encoder_dtype: the runtime's text-encoder dtype ("auto", "bfloat16", "float32"); recorded.
    vae_tiling: (tile, stride) in pixels of the runtime's tiled VAE, recorded in the manifest's VAE config
        (``runtime/tiling.py``); it bounds the VAE engine profiles. None: untiled.
    """

    budgets: tuple[int, ...] = (1024,)
    dtypes: tuple[str, ...] = ("fp32",)
    opset: int = DEFAULT_OPSET
    validate: bool = True
    validation_target_area: int = 512 * 512
    fp16_safety: float = FP16_SAFETY
    force: bool = False
    ort_fusions: bool = True
    pipeline_class: str | None = None
    text_encoder_dtype: str = "auto"
    vae_tiling: tuple[int, int] | None = (DEFAULT_TILE, DEFAULT_STRIDE)

    def __post_init__(self) -> None:
        bad = [d for d in self.dtypes if d not in PRECISIONS]
        if bad:
            raise ExportError(f"Unknown dtype(s) {bad}.", f"use {', '.join(PRECISIONS)}.")
        if self.opset < 17:
            raise ExportError(f"opset {self.opset} is too old.", "use --opset 17 or newer.")


def graph_file(name: str, precision: str) -> str:
    """Relative path of a graph: onnx/dit.onnx (fp32), onnx/dit.fp16.onnx, ..."""
    return f"onnx/{name}.onnx" if precision == "fp32" else f"onnx/{name}.{precision}.onnx"


def model_fingerprint(model_dir: Path) -> dict:
    """Configs by content, weights by (name, size, mtime) — hashing tens of GB on every run would dominate."""
    out = {}
    for f in sorted(model_dir.rglob("*")):
        if not f.is_file():
            continue
        rel = str(f.relative_to(model_dir))
        if f.suffix == ".json":
            out[rel] = sha256_file(f)
        elif f.suffix in (".safetensors", ".bin"):
            st = f.stat()
            out[rel] = [st.st_size, int(st.st_mtime)]
    return out


def tool_versions() -> dict[str, str]:
    import diffusers
    import onnxruntime

    from uniref_deploy import __version__

    return {"uniref-deploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "diffusers": diffusers.__version__}


def export_onnx(model_dir: str | os.PathLike, art_dir: str | os.PathLike, options: ExportOptions = ExportOptions(),
                progress: Progress | None = None) -> Manifest:
    """Export, lint and validate; returns the updated manifest (also saved to ``art_dir``).

    Raises:
        ExportError: export failed or an fp32 graph missed its tolerance (the report is written first).
        ManifestError: ``model_dir`` is not a diffusers folder.
    """
    say = progress or (lambda msg: logger.info(msg))
    model_dir, art = Path(model_dir), Path(art_dir)
    config = ModelConfig.from_diffusers_dir(model_dir, options.pipeline_class, options.text_encoder_dtype)
    if config.text_encoder_dir and _is_inside(Path(config.text_encoder_dir), art):
        # a model inside the artifact folder (compile of a preset) is referenced relatively: ART stays movable
        config = dataclasses.replace(config, text_encoder_dir=str(Path(config.text_encoder_dir).relative_to(art.resolve())))
    if options.vae_tiling is not None:
        tiling = VaeTiling(*options.vae_tiling)
        config = dataclasses.replace(config, vae={**config.vae, TILING_KEY: tiling.to_dict()})
    dtypes = tuple(dict.fromkeys(("fp32", *options.dtypes)))
    settings = {**asdict(options), "dtypes": list(dtypes)}
    versions = tool_versions()
    inputs_hash = sha256_json({"model": model_fingerprint(model_dir), "settings": settings, "versions": versions})
    manifest = _existing(art, config)
    previous = manifest.stage("export")
    if previous and previous.inputs_sha256 == inputs_hash and not options.force:
        try:
            manifest.verify_files(art)
            say("export: inputs unchanged, graphs verified; skipped")
            return manifest
        except ManifestError as err:
            say(f"export: re-running ({err.message})")

    t_start = time.perf_counter()
    say(f"export: loading {model_dir}")
    transformer, vae = _load(model_dir)
    dit_ref = QwenImageDitForExport(transformer).eval()
    enc_ref, dec_ref = VaeEncoderForExport(vae).eval(), VaeDecoderForExport(vae).eval()
    rope = RopeCache(RopeConfig.from_transformer_config(config.transformer))
    layouts = {b: validation_layouts(b, options.validation_target_area) for b in options.budgets}
    samples = [dit_sample(config, lay, txt, pad, seed=i, rope=rope)
               for b in options.budgets for i, (lay, txt, pad) in enumerate(layouts[b])]
    all_layouts = [lay for b in options.budgets for lay, _, _ in layouts[b]]
    dit_in, dit_out = graph_io(DIT, config)
    dit_names = [s.name for s in dit_in]

    ranges, keep_fp32 = {}, []
    if "fp16" in dtypes:
        say("export: measuring per-layer activation ranges for fp16")
        probe = [tuple(torch.from_numpy(np.ascontiguousarray(s.feeds[n])) for n in dit_names)
                 for s in samples if s.layout.num_image_tokens <= 12288]
        for s in samples[:1]:
            for t in (0.98, 0.5, 0.05):  # along the trajectory
                probe.append(tuple(torch.from_numpy(np.ascontiguousarray(
                    np.full_like(s.feeds[n], t) if n == "timestep" else s.feeds[n])) for n in dit_names))
        ranges = measure_activation_ranges(dit_ref, probe)
        keep_fp32 = fp16_overflow_layers(dit_ref, ranges, options.fp16_safety)
        say(f"export: {len(keep_fp32)} layer(s) stay fp32 in the fp16 graph" + (f": {keep_fp32}" if keep_fp32 else ""))

    example = dit_sample(config, _example_layout(), 7, batch=2, rope=rope)
    rows: list[ValidationRow] = []
    lint: dict[str, dict] = {}
    for precision in dtypes:
        dit_mod = _at_precision(dit_ref, precision, keep_fp32 if precision == "fp16" else [], rope_inputs=(4, 5, 6, 7))
        enc_mod, dec_mod = _at_precision(enc_ref, precision), _at_precision(dec_ref, precision)
        jobs = [
            (DIT, dit_mod, tuple(torch.from_numpy(example.feeds[n]) for n in dit_names), dit_ref,
             [(s.label, s.feeds) for s in samples]),
            (VAE_ENCODER, enc_mod, (torch.rand(2, 3, 64, 96) * 2 - 1,), enc_ref,
             [(f"image {x.shape[3]}x{x.shape[2]}", {"image": x}) for x in vae_encoder_samples(all_layouts)]),
            (VAE_DECODER, dec_mod, (torch.randn(2, config.latent_channels, 8, 12),), dec_ref,
             [(f"latent {z.shape[3]}x{z.shape[2]}", {"latent": z}) for z in vae_decoder_samples(config, all_layouts)]),
        ]
        if precision not in VAE_PRECISIONS:
            jobs = jobs[:1]  # ONNX Conv has no bf16 before opset 22: the VAE stays fp32/fp16 (runtime falls back)
        for name, module, args, reference, val_samples in jobs:
            inputs, outputs = graph_io(name, config)
            rel = graph_file(name, precision)
            say(f"export: {name} {precision} -> {rel}")
            t0 = time.perf_counter()
            with torch.no_grad():
                export_graph(module, args, art / rel, inputs, outputs, options.opset)
            seconds = time.perf_counter() - t0
            report = lint_model(onnx.load(str(art / rel), load_external_data=False), f"{name}.{precision}",
                                {s.name: s.dynamic_axes for s in (*inputs, *outputs)})
            lint[f"{name}.{precision}"] = report.to_dict()
            if not report:
                say(f"export: TensorRT lint flagged {name}.{precision}: {report.unsupported_ops} "
                    f"{report.float64[:3]} {report.static_dynamic_axes[:3]}")
            info = {"export_seconds": round(seconds, 2), "opset": options.opset, "trt_lint_passed": bool(report)}
            if name == DIT and precision == "fp16":
                info.update(fp32_layers=keep_fp32, activation_ranges={k: round(v, 4) for k, v in ranges.items()},
                            fp16_threshold=65504.0 / options.fp16_safety)
            if options.validate:
                say(f"export: validating {name} {precision} on {len(val_samples)} input(s)")
                fallback = (lambda m=module: m) if precision == "bf16" else None
                graph_rows = validate_graph(name, precision, art / rel, reference, val_samples,
                                            [s.name for s in inputs], fallback)
                rows.extend(graph_rows)
                info["validation"] = {"max_rel": max(r.result.rel_max for r in graph_rows),
                                      "min_cosine": min(r.result.cosine for r in graph_rows),
                                      "engine": graph_rows[0].engine,
                                      "passed": all(bool(r.result) for r in graph_rows)}
            manifest = manifest.with_graph(_graph_spec(art, name, precision, rel, inputs, outputs, info))
            if name == DIT and precision == "fp32":
                manifest = manifest.without_graph(f"{DIT}.fp32.{ORT_VARIANT}")
                _remove_graph_files(art, ort_file(rel))  # stale from an earlier export
                if options.ort_fusions:
                    spec, ort_rows = _ort_variant(art, rel, inputs, outputs, reference, val_samples, options, say,
                                                    int(config.transformer["num_attention_heads"]))
                    rows.extend(ort_rows)
                    manifest = manifest.with_graph(spec) if spec else manifest

    reports = art / "reports"
    atomic_write_text(reports / "trt_lint.json", json.dumps(lint, indent=2))
    if rows:
        atomic_write_text(reports / "export_validation.json", json.dumps([r.to_dict() for r in rows], indent=2))
        say("export validation (ONNX Runtime CPU vs torch fp32):\n" + format_table(rows))
    failed = [r for r in rows if r.precision == "fp32" and not r.result and r.graph != f"{DIT}.{ORT_VARIANT}"]
    manifest = manifest.with_budgets(tuple(budget_pixels(b) for b in options.budgets)).with_stage(StageRecord(
        stage="export", inputs_sha256=inputs_hash if not failed else "failed", settings=settings,
        seconds=round(time.perf_counter() - t_start, 2), tool_versions=versions,
        results={"validation_passed": not failed, "graphs": len(lint),
                 "trt_lint_passed": all(v["passed"] for v in lint.values())},
    ))
    manifest.save(art)
    if failed:
        worst = max(failed, key=lambda r: r.result.rel_max)
        raise ExportError(
            f"Validation failed: {worst.graph} fp32 on '{worst.sample}' differs from torch by "
            f"{worst.result.rel_max:.2e} of scale (tolerance {FP32_TOLERANCE:g}).",
            f"see {reports / 'export_validation.json'}.",
        )
    return manifest


def _ort_variant(art: Path, rel: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 reference: torch.nn.Module, samples: list, options: ExportOptions, say: Progress,
                 num_heads: int) -> tuple[GraphSpec | None, list[ValidationRow]]:
    """Fuse the portable fp32 DiT for ONNX Runtime and validate it; (None, rows) when it misses the tolerance."""
    fused = ort_file(rel)
    say(f"export: {DIT} fp32 -> {fused} (ONNX Runtime fusions)")
    t0 = time.perf_counter()
    counts = fuse_for_ort(art / rel, art / fused, [*inputs, *outputs], num_heads)
    info = {"fusions": counts, "contrib_ops": contrib_ops(art / fused), "source": rel,
            "ignores_text_mask": bool(counts.get("unmasked_attention")),
            "export_seconds": round(time.perf_counter() - t0, 2)}
    if info["ignores_text_mask"]:  # valid for unpadded text only: validate on those samples
        samples = [(label, feeds) for label, feeds in samples if feeds["encoder_hidden_states_mask"].all()]
    say(f"export: fused {', '.join(f'{k} x{v}' for k, v in counts.items()) or 'nothing'}")
    rows: list[ValidationRow] = []
    if options.validate and samples:
        say(f"export: validating {DIT} fp32 ({ORT_VARIANT}) on {len(samples)} input(s)")
        rows = [dataclasses.replace(r, graph=f"{DIT}.{ORT_VARIANT}")
                for r in validate_graph(DIT, "fp32", art / fused, reference, samples, [s.name for s in inputs])]
        passed = all(bool(r.result) for r in rows)
        info["validation"] = {"max_rel": max(r.result.rel_max for r in rows),
                              "min_cosine": min(r.result.cosine for r in rows), "engine": rows[0].engine,
                              "passed": passed}
        if not passed:
            logger.warning("the ONNX Runtime-fused DiT misses the fp32 tolerance; the runtime uses the portable graph")
            say("export: WARNING the ORT-fused DiT failed validation; not recorded (the portable graph is used)")
            _remove_graph_files(art, fused)
            return None, rows
    spec = _graph_spec(art, DIT, "fp32", fused, inputs, outputs, info)
    return dataclasses.replace(spec, variant=ORT_VARIANT), rows


def _remove_graph_files(art: Path, rel: str) -> None:
    for f in (art / rel, art / (rel + ".data")):
        f.unlink(missing_ok=True)


def _is_inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _example_layout():
    from uniref_deploy.runtime.packing import pack_references

    return pack_references([(96, 64)], 128 * 96, policy="per-image", width=64, height=64)


def _existing(art: Path, config: ModelConfig) -> Manifest:
    if (art / "manifest.json").is_file():
        try:
            old = Manifest.load(art)
            if old.model.transformer == config.transformer and old.model.vae == config.vae:
                return Manifest(config, old.budgets, old.graphs, old.engines, old.stages)
        except ManifestError:
            logger.warning("existing manifest in %s is unreadable; starting a new one", art)
    return Manifest(config)


def _load(model_dir: Path):
    import diffusers

    transformer = diffusers.QwenImageTransformer2DModel.from_pretrained(model_dir / "transformer",
                                                                        torch_dtype=torch.float32).eval()
    vae = diffusers.AutoencoderKLQwenImage.from_pretrained(model_dir / "vae", torch_dtype=torch.float32).eval()
    return transformer, vae


def _at_precision(module: torch.nn.Module, precision: str, keep_fp32: list[str] | tuple = (),
                  rope_inputs: tuple[int, ...] = ()) -> torch.nn.Module:
    if precision == "fp32":
        return module
    inner = to_precision(module, precision, keep_fp32)
    from .precision import DTYPES

    return IOCast(inner, DTYPES[precision], keep_float32=rope_inputs).eval()


def _graph_spec(art: Path, name: str, precision: str, rel: str, inputs: tuple[TensorSpec, ...],
                outputs: tuple[TensorSpec, ...], info: dict) -> GraphSpec:
    data = art / (rel + ".data")
    if data.is_file():
        info = {**info, "external_data_sha256": sha256_file(data), "external_data_bytes": data.stat().st_size}
    return GraphSpec(name=name, precision=precision, file=rel, sha256=sha256_file(art / rel), inputs=inputs,
                     outputs=outputs, external_data=rel + ".data" if data.is_file() else None, info=info)
