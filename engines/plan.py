"""Planning: which TensorRT engines to build from a manifest, as plain data (``BuildPlan``).

One engine per (graph, precision): the DiT at each requested precision that has a graph in the manifest, the
VAE encoder/decoder at fp16 (else fp32), and the prompt encoder's ``text_vision``/``text_encoder`` at fp16 (else
fp32) when the manifest has them (``Manifest.text``). Each engine holds one optimization profile per requested bucket, in
bucket order (``ranges.py`` derives them from the packing rules), so the weights exist once per precision.
Precision comes from the ONNX (strongly typed networks), so no precision flags appear. The plan is JSON, tested
everywhere, and is what ``build`` runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from uniref_deploy.runtime.budget import TRAINED_SIDES, Budget
from uniref_deploy.runtime.encoder_io import TEXT_GRAPHS
from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.fileio import atomic_write_text
from uniref_deploy.runtime.graphs import DIT, VAE_DECODER, VAE_ENCODER
from uniref_deploy.runtime.locking import writes_artifacts
from uniref_deploy.runtime.manifest import GraphSpec, Manifest
from uniref_deploy.runtime.precision import INT8_QDQ_VARIANT, PRECISIONS, VAE_PRECISIONS
from uniref_deploy.runtime.tiling import VaeTiling

from .ranges import axis_ranges, make_profile
from .records import ENGINE_DIR, PLAN_FILE, BuildPlan, EnginePlan, PlanOptions, SkippedEngine

VAE_ENGINE_PREFERENCE = tuple(sorted(VAE_PRECISIONS, key=lambda p: p != "fp16"))  # fp16 first, then fp32
# The prompt-encoder engines (when the manifest has ``text``) use the same preference. No fp8: calibration covers the
# DiT only, and Qwen2.5's language model carries outlier activation channels that per-tensor fp8 scales clip.

__all__ = ["PRECISIONS", "VAE_ENGINE_PREFERENCE", "PlanOptions", "engine_file", "make_plan", "plan_budgets", "save_plan"]


def engine_file(graph: str, precision: str) -> str:
    """``engines/<graph>.<precision>.plan`` (relative to the artifact folder)."""
    return f"{ENGINE_DIR}/{graph}.{precision}.plan"


def plan_budgets(manifest: Manifest, budgets: Sequence[Budget | int]) -> tuple[Budget, ...]:
    """The requested buckets, checked and sorted: trained budgets the manifest was exported for.

    Args:
        manifest (Manifest): its ``budgets`` (pixels) are the exported ones; empty allows any trained budget.
        budgets (Sequence[Budget | int]): ``Budget`` values, trained sides (1024) or pixel counts.

    Raises:
        InputError: no budgets, an untrained budget, or one the artifacts were not exported for.
    """
    exported = set(manifest.budgets)  # Budgets (Manifest coerces on construction)
    chosen = set()
    for value in budgets:
        budget = Budget.coerce(value)
        if not budget.is_trained:
            raise InputError(f"Budget {budget} is not a trained budget.",
                             f"use sides {', '.join(map(str, TRAINED_SIDES))}.")
        if exported and budget not in exported:
            have = ", ".join(b.name for b in sorted(exported))
            raise InputError(
                f"Budget {budget.name} is not among these artifacts' budgets ({have}); the runtime would refuse it.",
                f"pick from {have}, or re-run the export with --budgets including {budget.name}.",
            )
        chosen.add(budget)
    if not chosen:
        raise InputError("No budgets to plan.", f"pass sides such as {', '.join(map(str, TRAINED_SIDES))}.")
    return tuple(sorted(chosen))


def _missing_dit_reason(precision: str) -> str:
    if precision == "fp8":
        return "the manifest has no FP8 DiT graph (dit.fp8); run `uniref-deploy calibrate` first"
    if precision == "int8":
        return ("the manifest has no static INT8 Q/DQ DiT graph (dit.int8 with static activations, or "
                "dit.int8.qdq); run `uniref-deploy calibrate --precision int8` (not --activations dynamic)")
    return f"the manifest has no dit.{precision} graph; re-run `uniref-deploy export` with --dtypes including {precision}"


def dit_graph(manifest: Manifest, precision: str) -> GraphSpec | None:
    """The DiT graph an engine of ``precision`` is built from, or None.

    int8: TensorRT's explicit quantisation needs the static Q/DQ graph (int8 QuantizeLinear/DequantizeLinear on
    activations, per-channel weight scales): ``dit.int8.qdq`` when the CPU graph ``dit.int8`` is dynamic, else
    ``dit.int8`` itself when its activations are static.
    """
    if precision == "int8":
        if manifest.has_graph(DIT, "int8", INT8_QDQ_VARIANT):
            return manifest.graph(DIT, "int8", INT8_QDQ_VARIANT)
        if manifest.has_graph(DIT, "int8") and manifest.graph(DIT, "int8").info.get("activation_mode") == "static":
            return manifest.graph(DIT, "int8")
        return None
    return manifest.graph(DIT, precision) if manifest.has_graph(DIT, precision) else None


def _engine(graph: GraphSpec, budgets: tuple[Budget, ...], options: PlanOptions, vae_scale: int,
            text: dict | None = None) -> EnginePlan:
    profiles = tuple(make_profile(graph, b, axis_ranges(graph.name, b, options, vae_scale, text)) for b in budgets)
    return EnginePlan(
        graph=graph.name,
        precision=graph.precision,
        onnx_file=graph.file,
        onnx_sha256=graph.sha256,
        engine_file=engine_file(graph.name, graph.precision),
        profiles=profiles,
        builder_optimization_level=options.builder_optimization_level,
        strongly_typed=True,
        refittable=options.refittable,
        weight_streaming_budget=options.weight_streaming_budget if graph.name == DIT else None,
        timing_cache=options.timing_cache,
    )


def make_plan(manifest: Manifest, budgets: Sequence[Budget | int], precisions: Sequence[str] = ("fp16",),
              options: PlanOptions | None = None) -> BuildPlan:
    """Plan the engines of ``manifest`` for ``budgets`` and DiT ``precisions``.

    Args:
        manifest (Manifest): the artifact manifest (graphs with their inputs and sha256).
        budgets (Sequence[Budget | int]): the buckets (``Budget``, trained sides or pixel counts); one profile
            each in every engine.
        precisions (Sequence[str], default ("fp16",)): DiT precisions, from ``PRECISIONS``; each uses the DiT
            graph of that precision (fp8: the calibrated Q/DQ graph; int8: the static int8 Q/DQ graph, for GPUs
            without FP8) and is skipped with a reason when absent.
        options (PlanOptions | None, default None): shared settings (``PlanOptions()`` when None).

    Returns:
        BuildPlan: the DiT engines in precision order, then the VAE encoder and decoder; skipped engines with
        their reasons.

    Raises:
        InputError: an unknown precision, a budget that is not trained or not exported.
        ManifestError: a graph input with a dynamic axis the planner does not know.
    """
    options = options or PlanOptions()
    tiling = VaeTiling.from_vae_config(manifest.model.vae)
    if tiling is not None and options.vae_tile is None:
        options = dataclasses.replace(options, vae_tile=tiling.tile)
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise InputError(f"Unknown precision(s) {bad or list(precisions)}.", f"choose from {', '.join(PRECISIONS)}.")
    chosen = plan_budgets(manifest, budgets)
    vae_scale = manifest.model.vae_scale_factor
    engines: list[EnginePlan] = []
    skipped: list[SkippedEngine] = []
    for p in dict.fromkeys(precisions):
        graph = dit_graph(manifest, p)
        if graph is not None:
            engines.append(_engine(graph, chosen, options, vae_scale))
        else:
            skipped.append(SkippedEngine(DIT, p, _missing_dit_reason(p)))
    for name in (VAE_ENCODER, VAE_DECODER):
        vae_p = next((q for q in VAE_ENGINE_PREFERENCE if manifest.has_graph(name, q)), None)
        if vae_p is None:
            skipped.append(SkippedEngine(name, "fp16", f"the manifest has no {name} graph (fp16 or fp32)"))
        else:
            engines.append(_engine(manifest.graph(name, vae_p), chosen, options, vae_scale))
    if manifest.text:  # the prompt encoder, fp16 else fp32 (no fp8: see above)
        for name in TEXT_GRAPHS:
            text_p = next((q for q in VAE_ENGINE_PREFERENCE if manifest.has_graph(name, q)), None)
            if text_p is None:
                skipped.append(SkippedEngine(name, "fp16", f"the manifest has no {name} graph (fp16 or fp32)"))
            else:
                engines.append(_engine(manifest.graph(name, text_p), chosen, options, vae_scale, manifest.text))
    return BuildPlan(tuple(engines), options.timing_cache, tuple(skipped), options)


@writes_artifacts("build")
def save_plan(plan: BuildPlan, art_dir: str | Path) -> Path:
    """Write ``plan`` to ``ART/engines/plan.json`` atomically and return the path."""
    path = Path(art_dir) / PLAN_FILE
    atomic_write_text(path, plan.to_json() + "\n")
    return path
