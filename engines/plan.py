"""The engine build plan: which TensorRT plans to build, from which ONNX, with which profiles, as plain data.

One plan per (bucket, graph, precision): the DiT at each requested precision that has a graph in the manifest,
and the VAE encoder/decoder at fp16 (else fp32), one of each per bucket. Precision comes from the ONNX (strongly
typed networks), so no precision flags appear. The plan is JSON, tested everywhere, and is what ``build`` runs.

Profiles (bucket side ``s``, ``B = s*s`` pixels) cover every *profiled request*: policy ``self`` or
``proportional``, 0..``max_references(B)`` references with aspects within ``1:A..A:1`` (``A = max_aspect``, 8),
the default target or an explicit one (both sides with aspect within ``1:A..A:1``, or one side with the other
derived), and 1..1024 text tokens. Each range is the tightest box around these requests:

* DiT ``img_tokens``: min 1 (a 16x16 target, no references: the smallest request packing accepts); max
  ``2*B/256`` (target at area ``B`` plus references summing to ``B``); opt = max, because a default edit fills
  the budget (target at ``B``, references sharing ``B``) and lands within a few percent of it.
* DiT ``txt_tokens`` 1..1024, opt 256; ``batch`` 1..2 (batched CFG), opt 1 unless ``cfg_batch``.
* VAE encoder ``height``/``width`` (one reference per call, batch 1): min 32 (a tiny reference next to a large
  one under ``proportional`` is pinned to 32x32); max the long side of a lone ``A:1`` reference (2912 / 4320 /
  5792 px); opt ``s`` (a square reference at the full budget). Both axes share the range (either orientation).
* VAE decoder ``latent_height``/``latent_width``: target sides / 8: min 2 (16 px); max the longest target side
  (2912 / 4336 / 5808 px), reached by an ``A:1`` default target or a given width with the height derived; opt
  ``s/8``.

``per-image`` requests (diffusers parity mode) are not covered: each reference takes area ``B`` and rounding may
exceed it, so such a request can overflow the bucket; the TensorRT backend then refuses it with the token
counts. The VAE boxes span both orientations, so their max shape (``A*B`` pixels) costs activation memory;
lower ``max_aspect`` to shrink it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from uniref_deploy.runtime.errors import InputError, ManifestError, PackingError
from uniref_deploy.runtime.fileio import atomic_write_text, sha256_json
from uniref_deploy.runtime.graphs import (
    BATCH,
    DIT,
    HEIGHT,
    IMG_TOKENS,
    LATENT_HEIGHT,
    LATENT_WIDTH,
    TXT_TOKENS,
    VAE_DECODER,
    VAE_ENCODER,
    WIDTH,
)
from uniref_deploy.runtime.locking import writes_artifacts
from uniref_deploy.runtime.manifest import GraphSpec, Manifest, TensorSpec
from uniref_deploy.runtime.packing import (
    BUDGETS,
    PIXELS_PER_TOKEN_SIDE,
    budget_pixels,
    pack_references,
    target_size,
)
from uniref_deploy.runtime.text import MAX_TEXT_TOKENS

PLAN_SCHEMA_VERSION = 1
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
VAE_PRECISIONS = ("fp16", "fp32")  # preference order for the VAE engines
ENGINE_DIR = "engines"
PLAN_FILE = f"{ENGINE_DIR}/plan.json"
TIMING_CACHE_FILE = f"{ENGINE_DIR}/timing.cache"
PROFILED_POLICIES = ("self", "proportional")
MAX_OPT_LEVEL = 5


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisRange:
    """min/opt/max of one named dynamic axis."""

    min: int
    opt: int
    max: int

    def holds(self, size: int) -> bool:
        return self.min <= size <= self.max


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max shapes of one input, as in a TensorRT optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def holds(self, shape: Sequence[int]) -> bool:
        shape = tuple(shape)
        return len(shape) == len(self.min) and all(
            lo <= n <= hi for lo, n, hi in zip(self.min, shape, self.max, strict=True)
        )

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: Mapping) -> ShapeRange:
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


@dataclass(frozen=True)
class ProfilePlan:
    """One optimization profile: input name -> ``ShapeRange``, plus the axis ranges it was made from."""

    shapes: tuple[tuple[str, ShapeRange], ...]
    axes: tuple[tuple[str, AxisRange], ...] = ()

    def __getitem__(self, name: str) -> ShapeRange:
        for key, shape in self.shapes:
            if key == name:
                return shape
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.shapes)

    def axis(self, name: str) -> AxisRange:
        return dict(self.axes)[name]

    def holds(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        """True when every profiled input's shape in ``shapes`` lies within its range."""
        return all(rng.holds(shapes[name]) for name, rng in self.shapes)

    def to_dict(self) -> dict:
        return {
            "shapes": {name: rng.to_dict() for name, rng in self.shapes},
            "axes": {name: dataclasses.asdict(rng) for name, rng in self.axes},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ProfilePlan:
        return cls(
            tuple((name, ShapeRange.from_dict(r)) for name, r in d["shapes"].items()),
            tuple((name, AxisRange(**r)) for name, r in d.get("axes", {}).items()),
        )


@dataclass(frozen=True)
class PlanOptions:
    """Settings shared by every engine of a plan.

    Args:
        builder_optimization_level (int, default 3): TensorRT builder optimization level, 0..5.
        refittable (bool, default False): build refittable engines (weights can be swapped later).
        weight_streaming_budget (int | None, default None): bytes of DiT weights kept on the GPU; set to build
            weight-streamable DiT engines (the budget is applied when the runtime loads them).
        cfg_batch (bool, default False): plan for batched true CFG (DiT batch opt 2 instead of 1).
        max_aspect (int, default 8): the widest reference/target aspect (A:1) the VAE profiles cover.
        opt_text_tokens (int, default 256): text length the DiT profile is tuned for.
        timing_cache (str, default "engines/timing.cache"): timing cache file shared by all builds.

    Raises:
        InputError: a value out of range.
    """

    builder_optimization_level: int = 3
    refittable: bool = False
    weight_streaming_budget: int | None = None
    cfg_batch: bool = False
    max_aspect: int = 8
    opt_text_tokens: int = 256
    timing_cache: str = TIMING_CACHE_FILE

    def __post_init__(self) -> None:
        if not 0 <= self.builder_optimization_level <= MAX_OPT_LEVEL:
            raise InputError(
                f"builder_optimization_level {self.builder_optimization_level} is out of range.",
                f"use 0..{MAX_OPT_LEVEL} (TensorRT's default is 3).",
            )
        if self.weight_streaming_budget is not None and self.weight_streaming_budget < 0:
            raise InputError(f"weight_streaming_budget must be >= 0 bytes, got {self.weight_streaming_budget}.")
        if self.max_aspect < 1:
            raise InputError(f"max_aspect must be >= 1, got {self.max_aspect}.")
        if not 1 <= self.opt_text_tokens <= MAX_TEXT_TOKENS:
            raise InputError(f"opt_text_tokens must be in 1..{MAX_TEXT_TOKENS}, got {self.opt_text_tokens}.")


@dataclass(frozen=True)
class EnginePlan:
    """One TensorRT plan to build. Paths are relative to the artifact folder."""

    graph: str
    budget: int  # bucket side in pixels (1024 = a 1024x1024 budget)
    precision: str
    onnx_file: str
    onnx_sha256: str
    engine_file: str
    profiles: tuple[ProfilePlan, ...]
    builder_optimization_level: int = 3
    strongly_typed: bool = True
    refittable: bool = False
    weight_streaming_budget: int | None = None
    timing_cache: str = TIMING_CACHE_FILE

    @property
    def name(self) -> str:
        return f"{self.graph}.b{self.budget}.{self.precision}"

    @property
    def weight_streaming(self) -> bool:
        return self.weight_streaming_budget is not None

    def settings_sha256(self) -> str:
        """Hash of everything that shapes the engine (ONNX content, profiles, flags); not the cache path."""
        d = self.to_dict()
        d.pop("timing_cache")
        return sha256_json(d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["profiles"] = [p.to_dict() for p in self.profiles]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> EnginePlan:
        d = dict(d)
        d["profiles"] = tuple(ProfilePlan.from_dict(p) for p in d["profiles"])
        return cls(**d)


@dataclass(frozen=True)
class SkippedEngine:
    """An engine the plan could not include, and why."""

    graph: str
    budget: int
    precision: str
    reason: str


@dataclass(frozen=True)
class BuildPlan:
    """Every engine to build, the shared timing cache, what was skipped and the options used."""

    engines: tuple[EnginePlan, ...]
    timing_cache_file: str = TIMING_CACHE_FILE
    skipped: tuple[SkippedEngine, ...] = ()
    options: PlanOptions = field(default_factory=PlanOptions)

    def engine(self, name: str) -> EnginePlan:
        for e in self.engines:
            if e.name == name:
                return e
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema_version": PLAN_SCHEMA_VERSION,
                "timing_cache_file": self.timing_cache_file,
                "options": dataclasses.asdict(self.options),
                "engines": [e.to_dict() for e in self.engines],
                "skipped": [dataclasses.asdict(s) for s in self.skipped],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> BuildPlan:
        """Parse ``to_json`` output.

        Raises:
            ManifestError: not a build plan, or written by another schema version.
        """
        try:
            d = json.loads(text)
            if d.get("schema_version") != PLAN_SCHEMA_VERSION:
                raise ManifestError(
                    f"Build plan schema {d.get('schema_version')!r} is not supported (this build reads "
                    f"{PLAN_SCHEMA_VERSION}).",
                    "re-run `uniref-deploy build --dry-run` to write a new plan.",
                )
            return cls(
                engines=tuple(EnginePlan.from_dict(e) for e in d["engines"]),
                timing_cache_file=d["timing_cache_file"],
                skipped=tuple(SkippedEngine(**s) for s in d.get("skipped", ())),
                options=PlanOptions(**d.get("options", {})),
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ManifestError(f"Build plan is malformed ({err}).", "re-run `uniref-deploy build --dry-run`.") from err


# ---------------------------------------------------------------------------------------------------------
# Bucket ranges, derived from the packing rules
# ---------------------------------------------------------------------------------------------------------


def image_token_range(side: int) -> AxisRange:
    """DiT image tokens of bucket ``side``: the smallest request .. target at ``B`` + references at ``B``."""
    pixels = budget_pixels(side)
    smallest = pack_references([], pixels, width=PIXELS_PER_TOKEN_SIDE, height=PIXELS_PER_TOKEN_SIDE)
    most = 2 * (pixels // PIXELS_PER_TOKEN_SIDE**2)
    full = pack_references([(side, side)], pixels)  # default square target + one square reference
    return AxisRange(smallest.num_image_tokens, min(full.num_image_tokens, most), most)


def reference_side_range(side: int, max_aspect: int = 8) -> AxisRange:
    """Pixel sides a reference can get in bucket ``side`` (aspects within ``1:max_aspect..max_aspect:1``)."""
    pixels = budget_pixels(side)
    # proportional pins a reference far smaller than its neighbours at the 32 px minimum
    tiny = pack_references([(side, side), (1, 1)], pixels, policy="proportional").references[1]
    # the long side grows with the aspect and the area: one reference at the widest aspect takes the whole budget
    longest = max(
        pack_references([(max_aspect, 1)], pixels, policy=p).references[0].width for p in PROFILED_POLICIES
    )
    return AxisRange(min(tiny.width, tiny.height), side, longest)


def target_side_range(side: int, max_aspect: int = 8) -> AxisRange:
    """Pixel sides the target (output) can get in bucket ``side``."""
    pixels = budget_pixels(side)
    smallest = pack_references([], pixels, width=PIXELS_PER_TOKEN_SIDE, height=PIXELS_PER_TOKEN_SIDE).target
    default_long = max(target_size([(max_aspect, 1)], pixels, policy=p)[0] for p in PROFILED_POLICIES)
    return AxisRange(min(smallest.width, smallest.height), side,
                     max(default_long, _longest_given_side(pixels, max_aspect)))


def _longest_given_side(pixels: int, max_aspect: int) -> int:
    """Longest target side when the user gives sizes: a width with the height derived from an ``A:1`` reference
    (nearest multiple of 16), or both sides at an aspect within ``A:1``. Scanned from above; legality is
    monotone in the long side, so the first legal one is the answer.
    """
    step = PIXELS_PER_TOKEN_SIDE
    top = (math.isqrt(max_aspect * pixels) // step + max_aspect + 1) * step
    for long_side in range(top, step - 1, -step):
        try:
            target_size([(max_aspect, 1)], pixels, width=long_side)
            return long_side
        except PackingError:
            pass
        short = math.ceil(math.ceil(long_side / max_aspect) / step) * step
        if long_side * short <= pixels:
            return long_side
    return step


def axis_ranges(graph: str, side: int, options: PlanOptions, vae_scale: int = 8) -> dict[str, AxisRange]:
    """Named dynamic-axis ranges of ``graph`` in bucket ``side``.

    Args:
        graph (str): "dit", "vae_encoder" or "vae_decoder".
        side (int): bucket side in pixels.
        options (PlanOptions): cfg_batch, max_aspect, opt_text_tokens are used.
        vae_scale (int, default 8): VAE spatial downsample (latent side = pixel side / vae_scale).

    Returns:
        dict[str, AxisRange]: axis name -> range.
    """
    single = AxisRange(1, 1, 1)
    if graph == DIT:
        return {
            BATCH: AxisRange(1, 2 if options.cfg_batch else 1, 2),
            IMG_TOKENS: image_token_range(side),
            TXT_TOKENS: AxisRange(1, options.opt_text_tokens, MAX_TEXT_TOKENS),
        }
    if graph == VAE_ENCODER:
        ref = reference_side_range(side, options.max_aspect)
        return {BATCH: single, HEIGHT: ref, WIDTH: ref}
    if graph == VAE_DECODER:
        tgt = target_side_range(side, options.max_aspect)
        lat = AxisRange(tgt.min // vae_scale, tgt.opt // vae_scale, tgt.max // vae_scale)
        return {BATCH: single, LATENT_HEIGHT: lat, LATENT_WIDTH: lat}
    raise ManifestError(f"No engine profile rules for graph '{graph}'.", f"plan one of {DIT}, {VAE_ENCODER}, {VAE_DECODER}.")


def input_shapes(inputs: Sequence[TensorSpec], axes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes for axis sizes ``axes`` (static dims kept)."""
    return {s.name: tuple(axes[d] if isinstance(d, str) else d for d in s.shape) for s in inputs}


def make_profile(graph: GraphSpec, ranges: Mapping[str, AxisRange]) -> ProfilePlan:
    """Turn named axis ranges into per-input shape ranges for the inputs with dynamic axes.

    Raises:
        ManifestError: an input has a dynamic axis without a range.
    """
    shapes = []
    for spec in graph.inputs:
        if not spec.dynamic_axes:
            continue
        unknown = [d for d in spec.dynamic_axes.values() if d not in ranges]
        if unknown:
            raise ManifestError(
                f"Input '{spec.name}' of graph '{graph.key}' has dynamic axis {unknown[0]!r} the engine planner "
                f"has no range for (known: {', '.join(ranges)}).",
                "re-export the graph with this version of uniref-deploy.",
            )
        pick = {k: tuple(getattr(ranges[d], k) if isinstance(d, str) else d for d in spec.shape)
                for k in ("min", "opt", "max")}
        shapes.append((spec.name, ShapeRange(**pick)))
    used = {d for spec in graph.inputs for d in spec.dynamic_axes.values()}
    return ProfilePlan(tuple(shapes), tuple((k, v) for k, v in ranges.items() if k in used))


# ---------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------


def engine_file(graph: str, side: int, precision: str) -> str:
    """``engines/<graph>.b<side>.<precision>.plan`` (relative to the artifact folder)."""
    return f"{ENGINE_DIR}/{graph}.b{side}.{precision}.plan"


def _sides(manifest: Manifest, budgets: Sequence[int]) -> tuple[int, ...]:
    exported = {budget_pixels(b) for b in manifest.budgets}
    sides = []
    for b in budgets:
        pixels = budget_pixels(b)
        side = math.isqrt(pixels)
        if side * side != pixels or side not in BUDGETS:
            raise InputError(f"Budget {b} is not a trained budget.", f"use sides {', '.join(map(str, BUDGETS))}.")
        if exported and pixels not in exported:
            have = ", ".join(str(math.isqrt(p)) for p in sorted(exported))
            raise InputError(
                f"Budget {side} is not among these artifacts' budgets ({have}); the runtime would refuse it.",
                f"pick from {have}, or re-run the export with --budgets including {side}.",
            )
        sides.append(side)
    if not sides:
        raise InputError("No budgets to plan.", f"pass sides such as {', '.join(map(str, BUDGETS))}.")
    return tuple(sorted(set(sides)))


def _missing_dit_reason(precision: str) -> str:
    if precision == "fp8":
        return "the manifest has no FP8 DiT graph (dit.fp8); run `uniref-deploy calibrate` first"
    return f"the manifest has no dit.{precision} graph; re-run `uniref-deploy export` with --dtypes including {precision}"


def _engine(graph: GraphSpec, side: int, options: PlanOptions, vae_scale: int) -> EnginePlan:
    profile = make_profile(graph, axis_ranges(graph.name, side, options, vae_scale))
    return EnginePlan(
        graph=graph.name,
        budget=side,
        precision=graph.precision,
        onnx_file=graph.file,
        onnx_sha256=graph.sha256,
        engine_file=engine_file(graph.name, side, graph.precision),
        profiles=(profile,),
        builder_optimization_level=options.builder_optimization_level,
        strongly_typed=True,
        refittable=options.refittable,
        weight_streaming_budget=options.weight_streaming_budget if graph.name == DIT else None,
        timing_cache=options.timing_cache,
    )


def make_plan(manifest: Manifest, budgets: Sequence[int], precisions: Sequence[str] = ("fp16",),
              options: PlanOptions | None = None) -> BuildPlan:
    """Plan the engines of ``manifest`` for ``budgets`` and DiT ``precisions``.

    Args:
        manifest (Manifest): the artifact manifest (graphs with their inputs and sha256).
        budgets (Sequence[int]): bucket sides (1024, 1536, 2048) or pixel counts.
        precisions (Sequence[str], default ("fp16",)): DiT precisions, from ``PRECISIONS``; each uses the DiT
            graph of that precision (fp8: the calibrated Q/DQ graph) and is skipped with a reason when absent.
        options (PlanOptions | None, default None): shared settings (``PlanOptions()`` when None).

    Returns:
        BuildPlan: engines ordered by bucket, then graph; skipped engines with their reasons.

    Raises:
        InputError: an unknown precision, a budget that is not trained or not exported.
        ManifestError: a graph input with a dynamic axis the planner does not know.
    """
    options = options or PlanOptions()
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise InputError(f"Unknown precision(s) {bad or list(precisions)}.", f"choose from {', '.join(PRECISIONS)}.")
    precisions = tuple(dict.fromkeys(precisions))
    vae_scale = manifest.model.vae_scale_factor
    engines: list[EnginePlan] = []
    skipped: list[SkippedEngine] = []
    for side in _sides(manifest, budgets):
        for p in precisions:
            if manifest.has_graph(DIT, p):
                engines.append(_engine(manifest.graph(DIT, p), side, options, vae_scale))
            else:
                skipped.append(SkippedEngine(DIT, side, p, _missing_dit_reason(p)))
        for name in (VAE_ENCODER, VAE_DECODER):
            p = next((q for q in VAE_PRECISIONS if manifest.has_graph(name, q)), None)
            if p is None:
                skipped.append(SkippedEngine(name, side, "fp16", f"the manifest has no {name} graph (fp16 or fp32)"))
            else:
                engines.append(_engine(manifest.graph(name, p), side, options, vae_scale))
    return BuildPlan(tuple(engines), options.timing_cache, tuple(skipped), options)


@writes_artifacts("build")
def save_plan(plan: BuildPlan, art_dir: str | Path) -> Path:
    """Write ``plan`` to ``ART/engines/plan.json`` atomically and return the path."""
    path = Path(art_dir) / PLAN_FILE
    atomic_write_text(path, plan.to_json() + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def _shape_arg(name: str, shape: Sequence[int]) -> str:
    return f"{name}:[{','.join(str(n) for n in shape)}]"


def polygraphy_command(engine: EnginePlan, art_dir: str | Path = ".") -> list[str]:
    """The ``polygraphy convert`` argv that builds ``engine`` by hand (same settings as ``build_engines``)."""
    root = Path(art_dir)
    cache = str(root / engine.timing_cache)
    argv = ["polygraphy", "convert", str(root / engine.onnx_file), "--convert-to", "trt",
            "-o", str(root / engine.engine_file)]
    if engine.strongly_typed:
        argv.append("--strongly-typed")
    argv += ["--builder-optimization-level", str(engine.builder_optimization_level),
             "--load-timing-cache", cache, "--save-timing-cache", cache]
    for profile in engine.profiles:
        for key in ("min", "opt", "max"):
            argv += [f"--trt-{key}-shapes", *(_shape_arg(n, getattr(r, key)) for n, r in profile.shapes)]
    if engine.refittable:
        argv.append("--refittable")
    if engine.weight_streaming:
        argv.append("--weight-streaming")
    return argv


def polygraphy_commands(plan: BuildPlan, art_dir: str | Path = ".") -> list[str]:
    """One shell-quoted ``polygraphy convert`` command line per engine of ``plan``.

    Args:
        plan (BuildPlan): the plan.
        art_dir (str | Path, default "."): the artifact folder the paths are prefixed with.

    Returns:
        list[str]: runnable command lines (shape arguments are quoted: ``[`` is a shell glob).
    """
    return [shlex.join(polygraphy_command(e, art_dir)) for e in plan.engines]


def format_table(plan: BuildPlan) -> str:
    """The plan as a text table: one block per engine, one row per dynamic axis (min / opt / max)."""
    o = plan.options
    ws = "off" if o.weight_streaming_budget is None else f"DiT, budget {o.weight_streaming_budget} B"
    lines = [
        f"build plan: {len(plan.engines)} engine(s); strongly typed; opt level {o.builder_optimization_level}; "
        f"refittable {'yes' if o.refittable else 'no'}; weight streaming {ws}; timing cache {plan.timing_cache_file}",
    ]
    rows = [("engine", "onnx", "axis", "min", "opt", "max")]
    for e in plan.engines:
        for i, (axis, rng) in enumerate(e.profiles[0].axes):
            first = i == 0
            rows.append((e.engine_file if first else "", e.onnx_file if first else "", axis,
                         str(rng.min), str(rng.opt), str(rng.max)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        cells = [r[c].ljust(widths[c]) if c < 3 else r[c].rjust(widths[c]) for c in range(len(r))]
        lines.append("  ".join(cells).rstrip())
    for s in plan.skipped:
        lines.append(f"skipped {s.graph}.b{s.budget}.{s.precision}: {s.reason}")
    return "\n".join(lines)
