"""The export stage: diffusers folder -> ONNX graphs (DiT, VAE encoder, VAE decoder) + manifest + reports.

``export_onnx(model_dir, art_dir, ExportOptions(...))`` runs these steps, one function each:

    _plan            configs, settings, the input hash (an unchanged re-run is skipped after verifying files)
    _load_references the fp32 torch modules (lean: the DiT streamed from its checkpoint, never loaded whole)
    _fp16_islands    per-layer activation ranges -> layers that stay fp32 in the fp16 DiT
    _jobs            one GraphJob per (graph, precision): how to write it, its reference and samples
    _export_job      write, TensorRT lint, smoke validation (always: batch 1 and 2, ~300 tokens), full validation
                     (unless disabled), manifest entry; the fp32 DiT also gets its ORT-fused variant
    _finish          reports, stage record, manifest; an fp32 graph that missed its tolerance raises

A graph that missed the smoke or full validation is recorded with ``passed: false``; an ORT-fused variant that
missed either is not recorded at all, and the runtime prefers a fused variant only when it is validated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from uniref_deploy.runtime.artifacts import TRT_LINT_REPORT, VALIDATION_REPORT
from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.errors import ExportError, InputError, ManifestError
from uniref_deploy.runtime.fileio import atomic_write_text, sha256_file, sha256_json
from uniref_deploy.runtime.generation import Staging
from uniref_deploy.runtime.graphs import DIT, ROPE_INPUT_POSITIONS, VAE_DECODER, VAE_ENCODER, graph_io
from uniref_deploy.runtime.locking import writes_artifacts
from uniref_deploy.runtime.manifest import (
    ORT_VARIANT,
    GraphSpec,
    Manifest,
    ModelConfig,
    StageRecord,
    TensorSpec,
)
from uniref_deploy.runtime.precision import EXPORT_PRECISIONS, FP16_MAX, VAE_PRECISIONS
from uniref_deploy.runtime.rope import RopeCache, RopeConfig
from uniref_deploy.runtime.tiling import DEFAULT_STRIDE, DEFAULT_TILE, TILING_KEY, VaeTiling

from .graph_export import DEFAULT_OPSET, export_graph
from .lean import transformer_dir
from .lean_lora import LEAN_SOURCE_FILE, streamed_deltas, write_lean_lora_index
from .lean_rule import choose_lean, exceeds_ram_fraction
from .lora import LoraSpec, fuse_loras, save_lora_base, validate_loras
from .lora_swap import write_lora_index
from .onnx_files import external_data_record
from .ort_fusions import contrib_ops, fuse_for_ort, ort_file
from .precision import FP16_SAFETY, IOCast, fp16_overflow_layers, measure_activation_ranges, to_precision
from .qwen_image import QwenImageDitForExport, VaeDecoderForExport, VaeEncoderForExport
from .samples import (
    Sample,
    dit_sample,
    smoke_samples,
    vae_decoder_samples,
    vae_encoder_samples,
    vae_smoke_samples,
    validation_layouts,
)
from .scheduler_config import read_scheduler_config
from .trt_lint import lint_model
from .validate import FP32_TOLERANCE, ValidationRow, format_table, validate_graph

logger = logging.getLogger(__name__)
PRECISIONS = EXPORT_PRECISIONS  # the names `export --dtypes` accepts
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    """Args:
    budgets: budgets to record and validate (``Budget``s; ints are read as in ``Budget.coerce``).
    dtypes: graph precisions to export ("fp32" always comes first: it is the reference; not so in a lean export,
        where an fp32 DiT of a large model would not fit on disk: there the DiT gets exactly these).
    opset: ONNX opset (>= 17).
    validate: run the full ONNX Runtime vs torch validation (the smoke validation runs regardless).
    validation_target_area: target pixel cap for validation layouts above 1024² (memory bound, see samples.py).
    validation_area: pack the full validation's layouts at this many pixels instead of each bucket's (None: the
        bucket's); for real-width models whose S×S attention scores at a full bucket do not fit in memory.
    fp16_safety: layers whose measured |activation| exceeds FP16_MAX / fp16_safety stay fp32 in the fp16 graph.
    force: export even if the inputs are unchanged.
    ort_fusions: also write ``onnx/dit.ort.onnx``, the fp32 DiT with ONNX Runtime contrib-op fusions (validated
        like the portable graph; ONNX Runtime backends prefer it, TensorRT never uses it).
    lean: stream the DiT from its safetensors checkpoint into the graph's external data (export/lean.py) instead
        of loading it; None chooses by the DiT's size against RAM (export/lean_rule.py).
    consume_shards: (lean, one dtype) DELETE each checkpoint shard once streamed, for disks that cannot hold both
        the checkpoint and the graph's data; everything that reads the checkpoint runs before the streaming.
    pipeline_class: serve the model as this diffusers class (None: ``model_index.json``'s); recorded.
    text_encoder_dtype: the runtime's text-encoder dtype ("auto", "bfloat16", "float32"); recorded.
    loras: LoRAs fused into the DiT before export (export/lora.py); recorded (file, sha256, scale) in the stage
        settings, so the skip-on-rerun hash covers them.
    scheduler_config: a scheduler_config.json whose values replace the model's in the manifest (e.g. Lightning's).
    vae_tiling: (tile, stride) in pixels of the runtime's tiled VAE, recorded in the manifest's VAE config
        (``runtime/tiling.py``); it bounds the VAE engine profiles. None: untiled.
    text_graphs: also export the prompt encoder (``text_vision`` + ``text_encoder``, fp32/fp16) and ``ART/text/``
        (export/text_export.py) when the model folder has a text encoder.
    """

    budgets: tuple[Budget, ...] = (Budget.from_side(1024),)
    dtypes: tuple[str, ...] = ("fp32",)
    opset: int = DEFAULT_OPSET
    validate: bool = True
    validation_target_area: int = 512 * 512
    validation_area: int | None = None
    fp16_safety: float = FP16_SAFETY
    force: bool = False
    ort_fusions: bool = True
    lean: bool | None = None
    consume_shards: bool = False
    pipeline_class: str | None = None
    text_encoder_dtype: str = "auto"
    loras: tuple[LoraSpec, ...] = ()
    scheduler_config: Path | None = None
    vae_tiling: tuple[int, int] | None = (DEFAULT_TILE, DEFAULT_STRIDE)
    text_graphs: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgets", tuple(Budget.coerce(b) for b in self.budgets))
        bad = [d for d in self.dtypes if d not in PRECISIONS]
        if bad:
            raise InputError(f"Unknown dtype(s) {bad}.", f"use {', '.join(PRECISIONS)}.")
        if self.opset < 17:
            raise InputError(f"opset {self.opset} is too old.", "use --opset 17 or newer.")
        if self.consume_shards and (self.lean is False or len(set(self.dtypes) - {"fp32"}) > 1):
            raise InputError("consume_shards needs a lean export of one precision.",
                              "pass --lean and a single --dtypes value.")
        if self.validation_area is not None and self.validation_area < 64 * 64:
            raise InputError(f"validation area {self.validation_area} px is too small.",
                              "give at least 4096 pixels (64x64), e.g. --validation-area 262144.")


@dataclass
class GraphJob:
    """One graph at one precision: how to write it and what to check it against.

    ``write(path)`` exports the graph and returns extra manifest info; ``reference`` is the fp32 torch module;
    ``samples`` feed the full validation, ``smoke`` the smoke validation (label, feeds); ``fallback`` builds a torch
    module standing in for the graph when ONNX Runtime's CPU provider cannot run it (bf16).
    """

    name: str
    precision: str
    write: Callable[[Path], dict]
    reference: torch.nn.Module
    samples: list[tuple[str, dict]]
    smoke: list[tuple[str, dict]]
    fallback: Callable[[], torch.nn.Module] | None = None
    info: dict = field(default_factory=dict)
    twin_smoke: bool = False  # the graph is too large for ONNX Runtime here: smoke-validate a 2-block twin
    io: tuple | None = None  # (inputs, outputs) when not given by ``graph_io`` (the text graphs)

    @property
    def file(self) -> str:
        return graph_file(self.name, self.precision)


@dataclass
class _Run:
    """The state of one export: what was planned, loaded and recorded so far."""

    model_dir: Path
    art: Path
    options: ExportOptions
    say: Progress
    config: ModelConfig
    lean: bool
    dtypes: tuple[str, ...]
    settings: dict
    versions: dict
    inputs_hash: str
    manifest: Manifest
    rope: RopeCache
    references: dict[str, torch.nn.Module] = field(default_factory=dict)
    keep_fp32: list[str] = field(default_factory=list)
    ranges: dict[str, float] = field(default_factory=dict)
    rows: list[ValidationRow] = field(default_factory=list)
    lint: dict[str, dict] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    lora_base: dict = field(default_factory=dict)  # un-fused weights of the layers a LoRA touched
    lora_deltas: dict = field(default_factory=dict)  # lean: checkpoint key -> [(A, B, scale)], read once in _plan
    lean_keys: dict = field(default_factory=dict)  # lean: graph file -> {initializer: checkpoint key}
    text: object = None  # export/text_export.TextReferences when the text graphs are exported


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
        if f.suffix in (".json", ".txt", ".jinja"):  # configs, tokenizer vocab/merges, chat templates
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


@writes_artifacts("export", create=True)
def export_onnx(model_dir: str | os.PathLike, art_dir: str | os.PathLike, options: ExportOptions = ExportOptions(),
                progress: Progress | None = None) -> Manifest:
    """Export, lint and validate; returns the updated manifest (also saved to ``art_dir``).

    Raises:
        ExportError: export failed or an fp32 graph missed its tolerance (the report is written first).
        ManifestError: ``model_dir`` is not a diffusers folder.
    """
    run = _plan(Path(model_dir), Path(art_dir), options, progress or (lambda msg: logger.info(msg)))
    if _unchanged(run):
        return run.manifest
    live = run.art
    staging = Staging(live, "export")
    run.art = staging.root  # every file of this run is written beside the live artifact; _finish switches to it
    _load_references(run)
    _fp16_islands(run)
    for precision in run.dtypes:
        for job in _jobs(run, precision):
            _export_job(run, job)
    return _finish(run, staging, live)


def export_dtypes(dtypes: tuple[str, ...], lean: bool) -> tuple[str, ...]:
    """The precisions exported: fp32 first (the reference) and then ``dtypes``; a lean export takes ``dtypes``."""
    return tuple(dict.fromkeys(dtypes if lean else ("fp32", *dtypes)))


def _plan(model_dir: Path, art: Path, options: ExportOptions, say: Progress) -> _Run:
    config = ModelConfig.from_diffusers_dir(model_dir, options.pipeline_class, options.text_encoder_dtype)
    if config.text_encoder_dir and _is_inside(Path(config.text_encoder_dir), art):
        # a model inside the artifact folder (compile of a preset) is referenced relatively: ART stays movable
        config = dataclasses.replace(config, text_encoder_dir=str(Path(config.text_encoder_dir).relative_to(art.resolve())))
    lean = choose_lean(model_dir, options.lean, say)
    deltas = streamed_deltas(config.transformer, options.loras) if lean else {}
    if not lean:
        validate_loras(config.transformer, options.loras)
    if options.scheduler_config is not None:
        config = dataclasses.replace(config, scheduler=read_scheduler_config(options.scheduler_config))
    if options.vae_tiling is not None:
        tiling = VaeTiling(*options.vae_tiling)
        config = dataclasses.replace(config, vae={**config.vae, TILING_KEY: tiling.to_dict()})
    dtypes = export_dtypes(options.dtypes, lean)
    settings = {**asdict(options), "budgets": [b.pixels for b in options.budgets], "dtypes": list(dtypes),
                "lean": lean, "loras": [spec.record() for spec in options.loras],
                "scheduler_config": config.scheduler if options.scheduler_config else None}
    versions = tool_versions()
    inputs_hash = sha256_json({"model": model_fingerprint(model_dir), "settings": settings, "versions": versions})
    return _Run(model_dir, art, options, say, config, lean, dtypes, settings, versions, inputs_hash,
                _existing(art, config), RopeCache(RopeConfig.from_transformer_config(config.transformer)),
                lora_deltas=deltas)


def _unchanged(run: _Run) -> bool:
    previous = run.manifest.stage("export")
    if not previous or previous.inputs_sha256 != run.inputs_hash or run.options.force:
        return False
    try:
        run.manifest.verify_files(run.art)
    except ManifestError as err:
        run.say(f"export: re-running ({err.message})")
        return False
    run.say("export: inputs unchanged, graphs verified; skipped")
    return True


def _load_references(run: _Run) -> None:
    """The fp32 torch modules the graphs are exported from and checked against."""
    import diffusers

    run.say(f"export: loading {run.model_dir}" + (" (DiT streamed from its checkpoint: lean)" if run.lean else ""))
    if run.lean:
        from .lean_reference import streamed_dit

        dit = streamed_dit(run.model_dir, run.config, run.lora_deltas)
    else:
        transformer = diffusers.QwenImageTransformer2DModel.from_pretrained(run.model_dir / "transformer",
                                                                            torch_dtype=torch.float32).eval()
        run.lora_base = fuse_loras(transformer, run.options.loras, run.say)
        dit = QwenImageDitForExport(transformer).eval()
    vae = diffusers.AutoencoderKLQwenImage.from_pretrained(run.model_dir / "vae", torch_dtype=torch.float32).eval()
    run.references = {DIT: dit, VAE_ENCODER: VaeEncoderForExport(vae).eval(), VAE_DECODER: VaeDecoderForExport(vae).eval()}
    if run.options.text_graphs and run.config.text_encoder_dir:
        from .text_export import LeanText, load_text

        run.say("export: " + ("text encoder streamed from its checkpoint (lean)" if run.lean else
                              "loading the text encoder") + " (text_vision + text_encoder graphs)")
        run.text = LeanText(run.model_dir) if run.lean else load_text(run.model_dir)


def _dit_args(run: _Run, sample: Sample, timestep: float | None = None) -> tuple[torch.Tensor, ...]:
    names = [s.name for s in graph_io(DIT, run.config)[0]]
    feeds = sample.feeds
    return tuple(torch.from_numpy(np.ascontiguousarray(
        np.full_like(feeds[n], timestep) if n == "timestep" and timestep is not None else feeds[n])) for n in names)


def _fp16_islands(run: _Run) -> None:
    """Measure per-layer activation ranges (regular: validation layouts along the trajectory; lean: one smoke
    sample, each call re-reads the checkpoint) and keep the layers near fp16's range in fp32."""
    if "fp16" not in run.dtypes:
        return
    run.say("export: measuring per-layer activation ranges for fp16")
    dit = run.references[DIT]
    if run.lean:
        probe = [_dit_args(run, smoke_samples(run.config, run.rope)[0])]
    else:
        samples = _dit_samples(run)
        probe = [_dit_args(run, s) for s in samples if s.layout.num_image_tokens <= 12288]
        probe += [_dit_args(run, samples[0], t) for t in (0.98, 0.5, 0.05)]  # along the trajectory
    run.ranges = measure_activation_ranges(dit, probe)
    run.keep_fp32 = fp16_overflow_layers(dit, run.ranges, run.options.fp16_safety)
    run.say(f"export: {len(run.keep_fp32)} layer(s) stay fp32 in the fp16 graph"
            + (f": {run.keep_fp32}" if run.keep_fp32 else ""))


@functools.lru_cache(maxsize=8)
def _layouts(budget: Budget, target_area: int, validation_area: int | None) -> list:
    return validation_layouts(budget, target_area, validation_area)


def _dit_samples(run: _Run) -> list[Sample]:
    opts = run.options
    return [dit_sample(run.config, lay, txt, pad, seed=i, rope=run.rope) for b in opts.budgets
            for i, (lay, txt, pad) in enumerate(_layouts(b, opts.validation_target_area, opts.validation_area))]


def _jobs(run: _Run, precision: str) -> list[GraphJob]:
    """The graphs of one precision: the DiT, and the VAE encoder/decoder where ONNX has the precision."""
    opts, config = run.options, run.config
    refs = run.references
    layouts = [s.layout for s in _dit_samples(run)]
    images, latents = vae_smoke_samples(config)
    keep = run.keep_fp32 if precision == "fp16" else []
    dit_smoke = [(f"smoke batch={s.feeds['timestep'].shape[0]} {s.label}", s.feeds)
                 for s in smoke_samples(config, run.rope)]
    dit_full = [(s.label, s.feeds) for s in _dit_samples(run)] if opts.validate else []
    if run.lean:
        twin = run.options.consume_shards or exceeds_ram_fraction(run.model_dir)
        if twin and dit_full:
            run.say("export: the DiT graph does not fit ONNX Runtime in this machine's RAM; full validation skipped")
        dit = GraphJob(DIT, precision, functools.partial(_write_lean_dit, run, precision, keep), refs[DIT],
                       [] if twin else dit_full, dit_smoke, twin_smoke=twin)
    else:
        module = _at_precision(refs[DIT], precision, keep, rope_inputs=ROPE_INPUT_POSITIONS)
        example = dit_sample(config, _example_layout(), 7, batch=2, rope=run.rope)
        dit_in = graph_io(DIT, config)[0]
        args = tuple(torch.from_numpy(example.feeds[s.name]) for s in dit_in)
        dit = GraphJob(DIT, precision, functools.partial(_write_module, run, DIT, module, args), refs[DIT],
                       dit_full, dit_smoke, _bf16_fallback(module, precision))
    if precision == "fp16":
        dit.info.update(fp32_layers=keep, activation_ranges={k: round(v, 4) for k, v in run.ranges.items()},
                        fp16_threshold=FP16_MAX / opts.fp16_safety)
    jobs = [dit]
    if precision in VAE_PRECISIONS:  # ONNX Conv has no bf16 before opset 22: the VAE stays fp32/fp16
        enc, dec = _at_precision(refs[VAE_ENCODER], precision), _at_precision(refs[VAE_DECODER], precision)
        jobs.append(GraphJob(
            VAE_ENCODER, precision, functools.partial(_write_module, run, VAE_ENCODER, enc, (torch.rand(2, 3, 64, 96) * 2 - 1,)),
            refs[VAE_ENCODER],
            [(f"image {x.shape[3]}x{x.shape[2]}", {"image": x}) for x in vae_encoder_samples(layouts)] if opts.validate else [],
            [(f"smoke batch={x.shape[0]} image {x.shape[3]}x{x.shape[2]}", {"image": x}) for x in images]))
        jobs.append(GraphJob(
            VAE_DECODER, precision, functools.partial(_write_module, run, VAE_DECODER, dec,
                                                      (torch.randn(2, config.latent_channels, 8, 12),)),
            refs[VAE_DECODER],
            [(f"latent {z.shape[3]}x{z.shape[2]}", {"latent": z}) for z in vae_decoder_samples(config, layouts)]
            if opts.validate else [],
            [(f"smoke batch={z.shape[0]} latent {z.shape[3]}x{z.shape[2]}", {"latent": z}) for z in latents]))
    if run.text is not None:
        from .text_export import text_jobs

        jobs += [GraphJob(**kw) for kw in text_jobs(run.text, precision, opts.opset, opts.validate, opts.fp16_safety)]
    return jobs


def _bf16_fallback(module: torch.nn.Module, precision: str) -> Callable[[], torch.nn.Module] | None:
    return (lambda: module) if precision == "bf16" else None


def _write_module(run: _Run, name: str, module: torch.nn.Module, args: tuple, path: Path) -> dict:
    inputs, outputs = graph_io(name, run.config)
    with torch.no_grad():
        export_graph(module, args, path, inputs, outputs, run.options.opset)
    return {}


def _write_lean_dit(run: _Run, precision: str, keep_fp32: list[str], path: Path) -> dict:
    from .lean import export_dit_lean

    stats = export_dit_lean(run.model_dir, path, run.config, dtype=precision, progress=run.say, keep_fp32=keep_fp32,
                            opset=run.options.opset, consume_shards=run.options.consume_shards,
                            deltas=run.lora_deltas)
    run.lean_keys[str(path.relative_to(run.art))] = stats["initializer_keys"]
    return {"lean": {k: stats[k] for k in ("trace_seconds", "stream_seconds", "initializers", "lora_layers",
                                           "peak_rss_bytes")
                     if k in stats}}


def _export_job(run: _Run, job: GraphJob) -> None:
    """Write one graph, lint it, validate it (smoke always, full when asked) and record it in the manifest."""
    inputs, outputs = job.io or graph_io(job.name, run.config)
    rel, key = job.file, f"{job.name}.{job.precision}"
    run.say(f"export: {job.name} {job.precision} -> {rel}" + (" (lean)" if run.lean and job.name == DIT else ""))
    early = _twin_smoke(run, job) if job.twin_smoke else {}  # reads the checkpoint: before it may be consumed
    t0 = time.perf_counter()
    extra = job.write(run.art / rel)
    info = {"export_seconds": round(time.perf_counter() - t0, 2), "opset": run.options.opset, **extra, **job.info}
    report = lint_model(onnx.load(str(run.art / rel), load_external_data=False), key,
                        {s.name: s.dynamic_axes for s in (*inputs, *outputs)})
    run.lint[key] = report.to_dict()
    info["trt_lint_passed"] = bool(report)
    if not report:
        run.say(f"export: TensorRT lint flagged {key}: {report.unsupported_ops} "
                f"{report.float64[:3]} {report.static_dynamic_axes[:3]}")
    info.update(early or _validations(run, job, run.art / rel, [s.name for s in inputs]))
    if early and job.samples:
        info.update(_validations(run, dataclasses.replace(job, smoke=[]), run.art / rel, [s.name for s in inputs]))
    run.manifest = run.manifest.with_graph(_graph_spec(run.art, job.name, job.precision, rel, inputs, outputs, info))
    if job.name == DIT and job.precision == "fp32":
        run.manifest = run.manifest.without_graph(f"{DIT}.fp32.{ORT_VARIANT}")
        _remove_graph_files(run.art, ort_file(rel))  # stale from an earlier export
        if run.options.ort_fusions:
            spec = _ort_variant(run, job, inputs, outputs)
            run.manifest = run.manifest.with_graph(spec) if spec else run.manifest


TWIN_LAYERS = 2


def _twin_smoke(run: _Run, job: GraphJob) -> dict:
    """Smoke-validate a twin of the lean DiT with its first ``TWIN_LAYERS`` blocks, exported the same way from the
    same checkpoint (the blocks are one traced pattern repeated), for a graph too large for ONNX Runtime here."""
    import shutil
    import tempfile

    from .lean import export_dit_lean
    from .lean_reference import streamed_dit

    layers = min(TWIN_LAYERS, int(run.config.transformer.get("num_layers", TWIN_LAYERS)))
    twin = dataclasses.replace(run.config, transformer={**run.config.transformer, "num_layers": layers})
    run.say(f"export: the {job.name} graph does not fit ONNX Runtime in this machine's RAM: smoke-validating a "
            f"{layers}-block twin exported the same way")
    run.art.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smoke-twin.", dir=run.art))
    deltas = {k: v for k, v in run.lora_deltas.items() if _within_blocks(k, layers)}
    try:
        export_dit_lean(run.model_dir, tmp / "dit.onnx", twin, dtype=job.precision, opset=run.options.opset,
                        keep_fp32=[k for k in job.info.get("fp32_layers", ()) if _within_blocks(k, layers)],
                        deltas=deltas)
        twin_job = dataclasses.replace(job, reference=streamed_dit(run.model_dir, twin, deltas), samples=[])
        out = _validations(run, twin_job, tmp / "dit.onnx", [s.name for s in graph_io(DIT, twin)[0]],
                           graph=f"{job.name} ({layers}-block twin)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if "smoke" in out:
        out["smoke"]["twin_layers"] = layers
    return out


def _within_blocks(layer: str, blocks: int) -> bool:
    parts = layer.split(".")
    return "transformer_blocks" not in parts or int(parts[parts.index("transformer_blocks") + 1]) < blocks


def _validations(run: _Run, job: GraphJob, path: Path, names: list[str], graph: str | None = None) -> dict:
    """{"smoke": summary, "validation": summary (when samples)} for the graph at ``path``; rows go to the report."""
    out = {}
    for kind, samples in (("smoke", job.smoke), ("validation", job.samples)):
        if not samples:
            continue
        run.say(f"export: {kind} validation of {graph or job.name} {job.precision} on {len(samples)} input(s)")
        try:
            rows = validate_graph(job.name, job.precision, path, job.reference, samples, names, job.fallback)
        except Exception as err:  # ONNX Runtime cannot load or run it (e.g. lean bf16: no bf16 CPU kernels)
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            run.say(f"export: {kind} validation of {graph or job.name} {job.precision} FAILED to run: {reason}")
            out[kind] = {"passed": False, "error": reason}
            continue
        if graph:
            rows = [dataclasses.replace(r, graph=graph) for r in rows]
        run.rows.extend(rows)
        out[kind] = {"max_rel": max(r.result.rel_max for r in rows), "min_cosine": min(r.result.cosine for r in rows),
                     "engine": rows[0].engine, "passed": all(bool(r.result) for r in rows),
                     "batches": sorted({int(r.shapes[names[0]][0]) for r in rows})}
    return out


def _finish(run: _Run, staging: Staging, live: Path) -> Manifest:
    """Reports, the stage record and the manifest switch (``staging`` -> ``live``); raises when an fp32 graph
    missed its tolerance."""
    atomic_write_text(run.art / TRT_LINT_REPORT, json.dumps(run.lint, indent=2))
    rows = run.rows
    if rows:
        atomic_write_text(run.art / VALIDATION_REPORT, json.dumps([r.to_dict() for r in rows], indent=2))
        run.say("export validation (ONNX Runtime CPU vs torch fp32):\n" + format_table(rows))
    failed = [r for r in rows if r.precision == "fp32" and not r.result and r.graph != f"{DIT}.{ORT_VARIANT}"]
    errors = [(g.key, g.info[k]["error"]) for g in run.manifest.graphs if g.precision == "fp32" and not g.variant
              for k in ("smoke", "validation") if "error" in g.info.get(k, {})]
    smoke = [g.info["smoke"]["passed"] for g in run.manifest.graphs if "smoke" in g.info]
    run.manifest = run.manifest.with_budgets(run.options.budgets).with_stage(
        StageRecord(
            stage="export", inputs_sha256=run.inputs_hash if not (failed or errors) else "failed", settings=run.settings,
            seconds=round(time.perf_counter() - run.started, 2), tool_versions=run.versions,
            results={"validation_passed": not (failed or errors), "smoke_passed": all(p is True for p in smoke),
                     "graphs": len(run.lint), "lean": run.lean,
                     "trt_lint_passed": all(v["passed"] for v in run.lint.values())},
        ))
    if run.text is not None:
        from .text_export import text_limits, write_text_record

        limits = text_limits(run.config.pipeline_class, run.options.budgets, run.model_dir)
        run.manifest = run.manifest.with_text(write_text_record(run.text, run.model_dir, run.art,
                                                                "fp16" in run.dtypes, limits))
    elif not run.options.text_graphs:  # asked to skip: an earlier export's text graphs are dropped too
        from uniref_deploy.runtime.encoder_io import TEXT_GRAPHS

        for g in [g for g in run.manifest.graphs if g.name in TEXT_GRAPHS]:
            run.manifest = run.manifest.without_graph(g.key)
        run.manifest = run.manifest.with_text(None)
    save_lora_base(run.art, run.lora_base)
    if run.lean:
        write_lean_lora_index(run.art, run.config.transformer, run.lean_keys, transformer_dir(run.model_dir),
                              run.lora_deltas, consumed=run.options.consume_shards)
    else:
        write_lora_index(run.art, run.references[DIT], sorted(  # fp32 first: swaps read base weights from it
            (g.file for g in run.manifest.graphs if g.name == DIT and not g.variant and g.precision != "bf16"
             and (run.art / g.file).is_file()), key=lambda f: f != graph_file(DIT, "fp32")))
    run.manifest = staging.commit(run.manifest)
    if run.manifest.text is None:  # no prompt encoder recorded: host files of an earlier export are stale
        import shutil

        from uniref_deploy.runtime.encoder_io import TEXT_DIR

        shutil.rmtree(live / TEXT_DIR, ignore_errors=True)
    if not run.lora_base:
        save_lora_base(live, {})  # no LoRA fused now: a base file of an earlier export is stale
    if not run.lean:
        (live / LEAN_SOURCE_FILE).unlink(missing_ok=True)  # from an earlier lean export
    if errors:
        raise ExportError(f"Validation could not run {errors[0][0]} in ONNX Runtime: {errors[0][1]}",
                          f"see {live / VALIDATION_REPORT}; run with -vv for the export trace.")
    if failed:
        worst = max(failed, key=lambda r: r.result.rel_max)
        raise ExportError(
            f"Validation failed: {worst.graph} fp32 on '{worst.sample}' differs from torch by "
            f"{worst.result.rel_max:.2e} of scale (tolerance {FP32_TOLERANCE:g}).",
            f"see {live / VALIDATION_REPORT}.",
        )
    return run.manifest


def _ort_variant(run: _Run, job: GraphJob, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...]) -> GraphSpec | None:
    """Fuse the portable fp32 DiT for ONNX Runtime and validate it; None (files removed) unless it passes."""
    rel = job.file
    fused = ort_file(rel)
    run.say(f"export: {DIT} fp32 -> {fused} (ONNX Runtime fusions)")
    t0 = time.perf_counter()
    counts = fuse_for_ort(run.art / rel, run.art / fused, [*inputs, *outputs],
                          int(run.config.transformer["num_attention_heads"]))
    info = {"fusions": counts, "contrib_ops": contrib_ops(run.art / fused), "source": rel,
            "ignores_text_mask": bool(counts.get("unmasked_attention")),
            "export_seconds": round(time.perf_counter() - t0, 2)}
    run.say(f"export: fused {', '.join(f'{k} x{v}' for k, v in counts.items()) or 'nothing'}")
    if info["ignores_text_mask"]:  # valid for unpadded text only: validate on those samples
        job = dataclasses.replace(job, samples=[(label, f) for label, f in job.samples
                                                if f["encoder_hidden_states_mask"].all()])
    info.update(_validations(run, job, run.art / fused, [s.name for s in inputs], graph=f"{DIT}.{ORT_VARIANT}"))
    checks = [info[k]["passed"] for k in ("smoke", "validation") if k in info]
    if not checks or not all(c is True for c in checks):
        logger.warning("the ONNX Runtime-fused DiT is not validated; the runtime uses the portable graph")
        run.say("export: WARNING the ORT-fused DiT failed (or could not run) its validation; not recorded "
                "(the portable graph is used)")
        _remove_graph_files(run.art, fused)
        return None
    spec = _graph_spec(run.art, DIT, "fp32", fused, inputs, outputs, info)
    return dataclasses.replace(spec, variant=ORT_VARIANT)


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
                return Manifest(config, old.budgets, old.graphs, old.engines, old.stages, text=old.text)
        except ManifestError:
            logger.warning("existing manifest in %s is unreadable; starting a new one", art)
    return Manifest(config)


def _at_precision(module: torch.nn.Module, precision: str, keep_fp32: list[str] | tuple = (),
                  rope_inputs: tuple[int, ...] = ()) -> torch.nn.Module:
    if precision == "fp32":
        return module
    inner = to_precision(module, precision, keep_fp32)
    from .precision import DTYPES

    return IOCast(inner, DTYPES[precision], keep_float32=rope_inputs).eval()


def _graph_spec(art: Path, name: str, precision: str, rel: str, inputs: tuple[TensorSpec, ...],
                outputs: tuple[TensorSpec, ...], info: dict) -> GraphSpec:
    external, pins = external_data_record(art, rel)
    return GraphSpec(name=name, precision=precision, file=rel, sha256=sha256_file(art / rel), inputs=inputs,
                     outputs=outputs, external_data=external, info={**info, **pins})
