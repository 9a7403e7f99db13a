"""The build plan for people: ``polygraphy convert`` command lines and a text table."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from .records import BuildPlan, EnginePlan


def _shape_arg(name: str, shape: Sequence[int]) -> str:
    return f"{name}:[{','.join(str(n) for n in shape)}]"


def polygraphy_command(engine: EnginePlan, art_dir: str | Path = ".") -> list[str]:
    """The ``polygraphy convert`` argv that builds ``engine`` by hand (same settings as ``build_engines``).

    Each profile is one ``--trt-min-shapes``/``--trt-opt-shapes``/``--trt-max-shapes`` trio, in profile order.
    """
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
    """The plan as a text table: one block per engine, one row per (profile, dynamic axis): min / opt / max."""
    o = plan.options
    ws = "off" if o.weight_streaming_budget is None else f"DiT, budget {o.weight_streaming_budget} B"
    lines = [
        f"build plan: {len(plan.engines)} engine(s); strongly typed; opt level {o.builder_optimization_level}; "
        f"refittable {'yes' if o.refittable else 'no'}; weight streaming {ws}; timing cache {plan.timing_cache_file}",
    ]
    rows = [("engine", "onnx", "profile", "axis", "min", "opt", "max")]
    for e in plan.engines:
        for p, profile in enumerate(e.profiles):
            for i, (axis, rng) in enumerate(profile.axes):
                first_engine, first_axis = p == 0 and i == 0, i == 0
                rows.append((e.engine_file if first_engine else "", e.onnx_file if first_engine else "",
                             f"{p}: b{profile.budget.name}" if first_axis else "", axis,
                             str(rng.min), str(rng.opt), str(rng.max)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        cells = [r[c].ljust(widths[c]) if c < 4 else r[c].rjust(widths[c]) for c in range(len(r))]
        lines.append("  ".join(cells).rstrip())
    for s in plan.skipped:
        lines.append(f"skipped {s.name}: {s.reason}")
    return "\n".join(lines)
