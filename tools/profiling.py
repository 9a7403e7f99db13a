"""Latency profiling of the edit pipeline: per-stage percentiles per (backend, budget, reference count) and a
per-op breakdown from ONNX Runtime's profiler.

Honest VAE-encode and text-encode timings: the pipeline caches VAE latents and prompt embeddings by image content,
so every run (warm-up included) uses FRESH procedural references (a new seed per run); no run hits a cache.

Host overhead = total - (text encode + VAE encode + DiT + VAE decode): packing, RoPE tables, scheduler steps,
feed copies, image conversion, i.e. everything that is not a model call; reported as a share of the total.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.errors import InputError, MissingDependencyError
from uniref_deploy.runtime.fileio import atomic_write_text
from uniref_deploy.runtime.manifest import Manifest

logger = logging.getLogger(__name__)
Say = Callable[[str], None]

STAGES = ("text_encode", "vae_encode", "pack_rope", "dit", "scheduler", "vae_decode", "total")
MODEL_STAGES = ("text_encode", "vae_encode", "dit", "vae_decode")
PERCENTILES = (50, 90, 99)
PROMPT = "Put the object from picture 1 into the scene of the last picture, keep the lighting."
# reference sizes cycle through these aspects (scaled by the packer to the budget)
REFERENCE_SIZES = ((768, 512), (512, 768), (640, 640), (896, 512))
WARM_UP_SEED = 2**40  # the timed runs count seeds up from 1 (the per-op run uses 10_000)


@dataclass
class ProfileOptions:
    """What to profile.

    Args:
        backends: backends to run ("ort", "torch", "trt", "openvino", "openvino:bf16", ...); default ("ort",).
        budgets: budgets to run; None = every budget compiled into the artifacts. ONNX Runtime and torch run any
            budget up to the largest compiled one, TensorRT only compiled ones.
        refs: reference counts to profile; default (1, 2).
        steps: denoising steps per edit; default 8.
        warmup: untimed runs per configuration; default 1.
        runs: timed runs per configuration; default 3.
        width, height: output size; None = the last reference's aspect at the budget (without references: a
            square of the budget's area).
        policy: packing policy; default "self".
        precision: graph precision for ort/trt; default "fp32".
        op_profile: run one extra profiled edit per ort backend for the per-op table; default True.
    """

    backends: tuple[str, ...] = ("ort",)
    budgets: tuple[Budget, ...] | None = None
    refs: tuple[int, ...] = (1, 2)
    steps: int = 8
    warmup: int = 1
    runs: int = 3
    width: int | None = None
    height: int | None = None
    policy: str = "self"
    precision: str = "fp32"
    op_profile: bool = True

    def to_dict(self) -> dict:
        return {**asdict(self), "budgets": None if self.budgets is None else [b.name for b in self.budgets]}


def procedural_images(count: int, seed: int) -> list[Image.Image]:
    """``count`` RGB references (gradients, discs, bars and noise) unique per ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = REFERENCE_SIZES[i % len(REFERENCE_SIZES)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin((xx + yy) / rng.uniform(20, 60))], -1)
        cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.1, 0.3) * min(w, h)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        base[disc] = rng.uniform(0, 1, 3)
        base += rng.normal(0, 0.03, base.shape)
        out.append(Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8)))
    return out


def source_model_dir(art: Path, manifest: Manifest) -> Path:
    """The diffusers model the artifacts came from (manifest ``model.text_encoder_dir``, relative to ART)."""
    src = manifest.model.text_encoder_dir
    path = Path(src) if src and Path(src).is_absolute() else art / (src or "source")
    if not (path / "model_index.json").is_file():
        raise InputError(f"The torch backend needs the source model, but '{path}' is not a diffusers folder.",
                         "set model.text_encoder_dir in the manifest to the checkpoint the artifacts came from.")
    return path


def load_pipeline(art: Path, backend: str, precision: str | None = "fp32", load_text_encoder: bool = True, **options):
    """A pipeline on ``backend``: ort/trt/openvino over the artifacts, torch over the source model.

    ``backend`` may carry its own precision as ``NAME:PRECISION`` (``openvino:bf16``; ``openvino:auto`` is the
    measured choice per graph), overriding ``precision`` for that backend only.
    """
    from uniref_deploy.runtime._lazy import is_available
    from uniref_deploy.runtime.pipeline import Pipeline

    backend, _, own = backend.partition(":")
    if own:
        precision = None if own == "auto" else own
    manifest = Manifest.load(art)
    if backend == "torch":
        return Pipeline.from_pretrained(source_model_dir(art, manifest), load_text_encoder=load_text_encoder)
    if backend == "trt" and not is_available("tensorrt"):
        raise MissingDependencyError("The trt backend needs TensorRT, which cannot be imported on this machine.",
                                     "use --backend ort (or torch), or run where TensorRT and a GPU are available.")
    return Pipeline.from_artifacts(art, backend=backend, precision=precision, load_text_encoder=load_text_encoder,
                                   **options)


def check_backends(backends: Sequence[str]) -> None:
    """Fail fast (one line, exit 2) when trt is asked for and TensorRT is absent."""
    from uniref_deploy.runtime._lazy import is_available

    if "trt" in backends and not is_available("tensorrt"):
        raise MissingDependencyError("The trt backend needs TensorRT, which cannot be imported on this machine.",
                                     "use --backend ort (or torch), or run where TensorRT and a GPU are available.")


def warm_up_models(pipe) -> float:
    """Load every session and the text encoder before timing; returns the seconds it took.

    The text encoder warms up with as many references as the pipeline class needs at least (none for
    Edit-Plus, one for Edit), from a seed the timed runs never use, so no timed run hits its cache.
    """
    t0 = time.perf_counter()
    for b in pipe.backends.values():
        b.activate()
    if pipe.text_encoder is not None:
        images = procedural_images(pipe.pipeline_class.min_references, WARM_UP_SEED)
        pipe.text_encoder.encode("warm up", images, [im.size for im in images])
    return time.perf_counter() - t0


@dataclass
class RunRecord:
    backend: str
    budget: str  # Budget.name
    refs: int
    image_tokens: int
    target_tokens: int
    stages: dict[str, float]
    dit_steps: list[float] = field(default_factory=list)

    @property
    def host_overhead(self) -> float:
        return self.stages["total"] - sum(self.stages[s] for s in MODEL_STAGES)


def one_edit(pipe, budget: Budget, refs: int, opts: ProfileOptions, seed: int, backend: str) -> RunRecord:
    """Run one edit on fresh references and return its stage times."""
    images = procedural_images(refs, seed)
    embeds = None
    if pipe.text_encoder is None:  # no text model: fixed random embeddings (text stage then ~0)
        embeds = np.random.default_rng(0).standard_normal((1, 32, pipe.config.text_hidden_size)).astype(np.float32)
    prompt = f"{PROMPT} (variant {seed})"  # a new prompt every run: no text-embedding cache hits either
    width, height = opts.width, opts.height
    if refs == 0 and (width is None or height is None):  # no reference to take the aspect from: a square
        side = math.isqrt(budget.pixels) // 32 * 32
        width, height = width or side, height or side
    pipe(None if embeds is not None else prompt, image=images, prompt_embeds=embeds, num_inference_steps=opts.steps,
         budget=budget, policy=opts.policy, width=width, height=height, seed=seed, output_type="np")
    t, layout = pipe.last_times, pipe.last_layout
    stages = {s: (sum(t.dit) if s == "dit" else float(getattr(t, s))) for s in STAGES}
    return RunRecord(backend, budget.name, refs, layout.num_image_tokens, layout.num_target_tokens, stages, list(t.dit))


def percentiles(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}


def summarise(records: list[RunRecord]) -> list[dict]:
    """One row per (backend, budget, refs): per-stage percentiles (seconds), DiT-step percentiles, overhead %."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.backend, r.budget, r.refs), []).append(r)
    rows = []
    for (backend, budget, refs), rs in groups.items():
        rows.append({
            "backend": backend, "budget": budget, "refs": refs, "runs": len(rs),
            "image_tokens": rs[0].image_tokens, "target_tokens": rs[0].target_tokens,
            "stages": {s: percentiles([r.stages[s] for r in rs]) for s in STAGES},
            "dit_step": percentiles([d for r in rs for d in r.dit_steps]),
            "host_overhead_s": percentiles([r.host_overhead for r in rs]),
            "host_overhead_pct": percentiles([100.0 * r.host_overhead / r.stages["total"] for r in rs]),
        })
    return rows


def summarise_ort_trace(path: str | Path) -> dict:
    """ONNX Runtime profiler trace -> {op_type: {ms, count, share}} over the kernel events, largest first."""
    events = json.loads(Path(path).read_text())
    ops: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        slot = ops.setdefault(op, {"ms": 0.0, "count": 0})
        slot["ms"] += e.get("dur", 0) / 1000.0
        slot["count"] += 1
    total = sum(v["ms"] for v in ops.values()) or 1.0
    for v in ops.values():
        v["share"] = v["ms"] / total
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]["ms"]))


def op_profile(art: Path, budget: Budget, refs: int, opts: ProfileOptions, out: Path) -> dict:
    """One extra edit with ORT's profiler on (a separate pipeline, so timed runs carry no profiler cost)."""
    pipe = load_pipeline(art, "ort", opts.precision)
    trace_dir = out / "traces"
    trace_dir.mkdir(parents=True, exist_ok=True)
    for name, b in pipe.backends.items():
        b.profile_prefix = str(trace_dir / f"ort_{name}")  # one prefix per graph: their traces never collide
    warm_up_models(pipe)
    one_edit(pipe, budget, refs, opts, seed=10_000, backend="ort")
    result = {}
    for name, b in pipe.backends.items():
        trace = b.end_profiling()
        if trace:
            result[name] = {"trace": str(Path(trace).relative_to(out)) if Path(trace).is_relative_to(out) else trace,
                            "ops": summarise_ort_trace(trace)}
    pipe.close()
    return {"backend": "ort", "budget": budget.name, "refs": refs, "graphs": result}


def run_profile(art: str | Path, opts: ProfileOptions, out: str | Path, say: Say = logger.info) -> dict:
    """Profile every (backend, budget, refs) and write profile.json, profile.md and PNG plots into ``out``.

    Returns:
        dict: the report written to profile.json.

    Raises:
        MissingDependencyError: trt requested without TensorRT.
        InputError / PackingError / ManifestError: bad budgets (over the largest compiled one, or not compiled
            for trt), reference counts or artifacts.
    """
    from uniref_deploy.tools import plots

    art, out = Path(art), Path(out)
    manifest = Manifest.load(art)
    check_backends(opts.backends)
    budgets = tuple(opts.budgets or manifest.budgets or (Budget.from_side(1024),))
    records: list[RunRecord] = []
    loads = {}
    for backend in opts.backends:
        pipe = load_pipeline(art, backend, opts.precision)
        for budget in budgets:
            pipe.check_budget(budget)  # fail before any timing run
        loads[backend] = warm_up_models(pipe)
        say(f"{backend}: models loaded in {loads[backend]:.1f} s")
        seed = 0
        for budget in budgets:
            for refs in opts.refs:
                for i in range(opts.warmup + opts.runs):
                    seed += 1  # fresh references every run: no VAE/text cache hits
                    rec = one_edit(pipe, budget, refs, opts, seed, backend)
                    if i >= opts.warmup:
                        records.append(rec)
                say(f"{backend} budget {budget} refs {refs}: {rec.image_tokens} image tokens, "
                    f"last total {rec.stages['total']:.2f} s")
        pipe.close()
    ops = []
    if opts.op_profile and "ort" in opts.backends:
        ops.append(op_profile(art, budgets[-1], max(opts.refs), opts, out))
    if "trt" in opts.backends:
        ops.append({"backend": "trt", "note": "TensorRT layer profiling is not wired into the trt backend yet."})
    report = {
        "artifacts": str(art), "options": opts.to_dict(), "model_load_s": loads,
        "notes": ["Fresh procedural references every run: VAE-encode and text-encode times are uncached.",
                  "host overhead = total - (text_encode + vae_encode + dit + vae_decode)."],
        "summary": summarise(records), "runs": [asdict(r) for r in records], "op_profile": ops,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "profile.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "profile.md", format_markdown(report))
    report["plots"] = plots.profile_plots(report, out)
    atomic_write_text(out / "profile.json", json.dumps(report, indent=2) + "\n")
    return report


def format_markdown(report: dict) -> str:
    """Markdown tables: stage latency percentiles (ms), host overhead, per-op breakdown."""
    lines = ["# Latency profile", "", f"Artifacts: `{report['artifacts']}`; steps {report['options']['steps']}, "
             f"runs {report['options']['runs']}, warm-up {report['options']['warmup']}.", ""]
    lines += [f"- {n}" for n in report["notes"]] + [""]
    head = "| backend | budget | refs | img tokens | stage | p50 ms | p90 ms | p99 ms |"
    lines += ["## Stages", "", head, "|---|---|---|---|---|---|---|---|"]
    for row in report["summary"]:
        key = f"| {row['backend']} | {row['budget']} | {row['refs']} | {row['image_tokens']} "
        entries = [(s, row["stages"][s]) for s in STAGES[:-1]] + [("dit step", row["dit_step"]),
                                                                 ("host overhead", row["host_overhead_s"]),
                                                                 ("total", row["stages"]["total"])]
        for name, p in entries:
            lines.append(key + f"| {name} | {p['p50'] * 1e3:.1f} | {p['p90'] * 1e3:.1f} | {p['p99'] * 1e3:.1f} |")
    lines += ["", "## Host overhead (share of total)", "", "| backend | budget | refs | p50 % | p90 % | p99 % |",
              "|---|---|---|---|---|---|"]
    for row in report["summary"]:
        p = row["host_overhead_pct"]
        lines.append(f"| {row['backend']} | {row['budget']} | {row['refs']} | {p['p50']:.2f} | {p['p90']:.2f} | "
                     f"{p['p99']:.2f} |")
    for prof in report["op_profile"]:
        if "graphs" not in prof:
            lines += ["", f"## Per-op ({prof['backend']})", "", prof.get("note", "")]
            continue
        lines += ["", f"## Per-op ({prof['backend']}, budget {prof['budget']}, {prof['refs']} refs, one edit)"]
        for graph, g in prof["graphs"].items():
            lines += ["", f"### {graph}", "", "| op type | total ms | calls | share |", "|---|---|---|---|"]
            for op, v in list(g["ops"].items())[:12]:
                lines.append(f"| {op} | {v['ms']:.1f} | {v['count']} | {100 * v['share']:.1f}% |")
    return "\n".join(lines) + "\n"
