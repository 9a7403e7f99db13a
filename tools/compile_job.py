"""The main job: preset (when named) -> export -> calibrate (fp8) -> runtime check -> engine plan/build.

Each stage reports a ``StageSummary`` row; the closing table says what ran, what was skipped and why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uniref_deploy.runtime.artifacts import ENGINE_PLAN, VALIDATION_REPORT
from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.errors import CheckFailed, InputError
from uniref_deploy.runtime.locking import writes_artifacts
from uniref_deploy.runtime.manifest import MANIFEST_NAME, Manifest, StageRecord
from uniref_deploy.runtime.precision import EXPORT_PRECISIONS
from uniref_deploy.tools.model_source import PRESET_NAMES

Say = Callable[[str], None]


@dataclass
class StageSummary:
    """One row of the closing table."""

    stage: str
    status: str  # "done" | "skipped" | "unchanged"
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    note: str = ""


def _size(art: Path, files: Sequence[str]) -> int:
    return sum((art / f).stat().st_size for f in files if (art / f).is_file())


def format_summary(rows: list[StageSummary], art: Path) -> str:
    """The closing table: stage, status, files, size, seconds, note."""
    head = f"{'stage':<11} {'status':<10} {'files':>5} {'size':>10} {'seconds':>8}  note"
    lines = [head, "-" * 100]
    for r in rows:
        size = _size(art, r.files)
        size_text = f"{size / 2**20:.1f} MiB" if r.files else "-"
        lines.append(f"{r.stage:<11} {r.status:<10} {len(r.files):>5} {size_text:>10} {r.seconds:>8.1f}  {r.note}")
    return "\n".join(lines)


@writes_artifacts("compile", create=True)
def compile_model(source: str, art_dir: str | Path, budgets: Sequence[Budget | int], precisions: Sequence[str],
                  say: Say, seed: int = 0, validate: bool = True, force: bool = False,
                  calibration_samples: int | None = None, loras: tuple = (),
                  scheduler_config: Path | None = None, text_graphs: bool = True) -> tuple[Manifest, list[StageSummary]]:
    """Run every stage into ``art_dir``; returns the manifest and the summary rows.

    ``budgets`` are ``Budget``s (ints are read as in ``Budget.coerce``: pixels, or a trained side).

    ``precisions`` are engine precisions: export writes fp32 plus those of them it makes (fp16 also for fp8,
    whose non-quantised layers calibration stores in fp16); fp8 runs calibration.
    """
    from uniref_deploy.export.exporter import ExportOptions, export_onnx

    art = Path(art_dir)
    budgets = sorted(Budget.coerce(b) for b in budgets)
    rows: list[StageSummary] = []

    # 1. the model: a preset is built inside the artifact folder, so ART is self-contained
    t0 = time.perf_counter()
    if source in PRESET_NAMES and not Path(source).exists():
        from uniref_deploy.presets import build_preset

        model_dir = build_preset(source, art / "source", seed=seed)
        rows.append(StageSummary("preset", "done", time.perf_counter() - t0, note=f"'{source}' (seed {seed}) in source/"))
    else:
        model_dir = Path(source)
        if not (model_dir / "model_index.json").is_file():
            raise InputError(f"'{source}' is not a diffusers model folder nor a preset name.",
                             f"pass a folder with model_index.json or one of {', '.join(PRESET_NAMES)}.")

    # 2. export (fp32 reference + the reduced precisions the engines need)
    wanted = {*precisions, *(("fp16",) if "fp8" in precisions else ())}
    dtypes = ["fp32"] + [p for p in EXPORT_PRECISIONS[1:] if p in wanted]
    t0 = time.perf_counter()
    before = Manifest.load(art).stage("export") if (art / MANIFEST_NAME).is_file() else None
    manifest = export_onnx(model_dir, art, ExportOptions(budgets=tuple(budgets), dtypes=tuple(dtypes),
                                                         validate=validate, force=force, loras=tuple(loras),
                                                         scheduler_config=scheduler_config, text_graphs=text_graphs),
                           progress=say)
    after = manifest.stage("export")
    unchanged = before is not None and after == before
    rows.append(StageSummary("export", "unchanged" if unchanged else "done", time.perf_counter() - t0,
                             [g.file for g in manifest.graphs if g.precision in dtypes],
                             "inputs unchanged; skipped" if unchanged else
                             f"{len(dtypes)} precision(s), validated on {len(budgets)} bucket(s)"))

    # 3. FP8 calibration
    if "fp8" in precisions:
        from uniref_deploy.calibration.fp8 import CalibrationOptions, calibrate_fp8

        t0 = time.perf_counter()
        opts = CalibrationOptions() if calibration_samples is None else CalibrationOptions(samples=calibration_samples)
        manifest = calibrate_fp8(art, opts, progress=say)
        rows.append(StageSummary("calibrate", "done", time.perf_counter() - t0,
                                 [g.file for g in manifest.graphs if g.precision == "fp8"]))

    # 4. the runtime on ONNX Runtime against the torch reference, end to end
    t0 = time.perf_counter()
    if loras:  # the torch reference pipeline has no LoRA; the export validated against the LoRA-fused DiT
        rows.append(StageSummary("runtime", "skipped", note="LoRA fused: export validation compared against the "
                                 "LoRA-fused torch DiT"))
    else:
        manifest = _runtime_check(art, model_dir, min(budgets), rows, t0)

    # 5. engines: build where TensorRT and a GPU exist, else write the plan
    from uniref_deploy.engines.build import build_engines, check_build_environment
    from uniref_deploy.engines.plan import PlanOptions, make_plan, save_plan

    t0 = time.perf_counter()
    plan = make_plan(manifest, budgets, precisions, PlanOptions())
    reason = check_build_environment()
    if reason is not None:
        save_plan(plan, art)
        rows.append(StageSummary("engines", "skipped", time.perf_counter() - t0, [ENGINE_PLAN],
                                 f"{reason}; plan for {len(plan.engines)} engine(s) in {ENGINE_PLAN} "
                                 "(`uniref-deploy build ART --dry-run` prints the polygraphy commands)"))
    else:
        manifest = build_engines(art, plan)
        rows.append(StageSummary("engines", "done", time.perf_counter() - t0, [e.file for e in manifest.engines]))
    return Manifest.load(art), rows


def _runtime_check(art: Path, model_dir: Path, budget: Budget, rows: list[StageSummary], t0: float) -> Manifest:
    """Stage 4: ``runtime_check`` recorded in the manifest and the summary; raises when it missed its tolerance."""
    check = runtime_check(art, model_dir, budget)
    manifest = Manifest.load(art).with_stage(StageRecord("runtime_check", "-", {"budget": budget.pixels},
                                                         round(time.perf_counter() - t0, 2), results=check))
    manifest.save(art)
    rows.append(StageSummary("runtime", "done", time.perf_counter() - t0,
                             note=f"ORT vs torch edit: max abs {check['max_abs']:.2e} (tol {check['tolerance']:.4f})"))
    if not check["passed"]:
        raise CheckFailed(f"The ONNX Runtime edit differs from torch by {check['max_abs']:.3g} "
                          f"(tolerance {check['tolerance']:.4f}).", f"see {VALIDATION_REPORT}.")
    return manifest


def runtime_check(art: Path, model_dir: Path, budget: Budget, steps: int = 2) -> dict:
    """One small edit through ``Pipeline.from_artifacts(ort)`` and ``from_pretrained(torch)``; max abs diff."""
    from PIL import Image

    from uniref_deploy.runtime.pipeline import Pipeline

    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (160, 96, 3), dtype=np.uint8))]
    kw = dict(image=refs, negative_prompt="blurry", num_inference_steps=steps, budget=budget, seed=0,
              width=256, height=256, output_type="np")
    ort_out = Pipeline.from_artifacts(art, backend="ort")("add a red hat", **kw)
    torch_out = Pipeline.from_pretrained(model_dir)("add a red hat", **kw)
    max_abs = float(np.abs(ort_out - torch_out).max())
    tol = 2.0 / 255.0
    return {"max_abs": max_abs, "tolerance": tol, "passed": max_abs <= tol, "steps": steps,
            "image": list(ort_out.shape)}
