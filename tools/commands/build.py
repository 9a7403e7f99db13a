"""`uniref-deploy build ART`: plan one TensorRT engine per (graph x precision) with a profile per bucket, and build
them, or print the plan."""

from __future__ import annotations

import dataclasses
import json

import click

from uniref_deploy.runtime.errors import InputError


def _parse_bytes(text: str | None) -> int | None:
    """'8G' / '512M' / '1048576' -> bytes (K/M/G are binary units)."""
    if text is None:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    body, scale = (text[:-1], units[text[-1].upper()]) if text and text[-1].upper() in units else (text, 1)
    try:
        value = int(float(body) * scale)
    except ValueError as err:
        raise InputError(f"--weight-streaming-budget '{text}' is not a byte count.", "e.g. 8G or 8589934592.") from err
    if value < 0:
        raise InputError(f"--weight-streaming-budget must be >= 0, got {text}.")
    return value


@click.command("build")
@click.argument("art_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--budgets", default=None, help="Bucket sides, e.g. 1024,1536 (default: the manifest's budgets).")
@click.option("--precision", "precision_list", default="fp16", show_default=True,
              help="DiT precisions, comma-separated, from fp16,bf16,fp8,fp32 (fp8 needs a calibrated graph).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level.")
@click.option("--weight-streaming-budget", default=None,
              help="Build weight-streamable DiT engines keeping this many bytes on the GPU (e.g. 8G).")
@click.option("--refittable", is_flag=True, help="Build refittable engines.")
@click.option("--force", is_flag=True, help="Rebuild engines even when up to date.")
@click.option("--dry-run", is_flag=True, help="Print the plan and polygraphy commands; write engines/plan.json.")
@click.option("--gpu-memory", type=float, default=None,
              help="With --dry-run: GPU memory in GiB; print the memory plan per engine and profile.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (or the built engines) as JSON.")
def command(art_dir, budgets, precision_list, opt_level, weight_streaming_budget, refittable, force, dry_run,
            gpu_memory, as_json) -> None:
    """Build one TensorRT engine per (graph x precision), one profile per bucket, for the artifacts in ART_DIR."""
    from uniref_deploy.engines.plan import PRECISIONS, PlanOptions, make_plan, save_plan
    from uniref_deploy.engines.render import format_table, polygraphy_commands
    from uniref_deploy.runtime.budget import Budget, trained_budgets
    from uniref_deploy.runtime.errors import MissingDependencyError
    from uniref_deploy.runtime.manifest import Manifest
    from uniref_deploy.tools.options import parse_budgets, parse_list

    manifest = Manifest.load(art_dir)
    chosen = parse_budgets(budgets) if budgets is not None else manifest.budgets or trained_budgets()[:1]
    options = PlanOptions(builder_optimization_level=opt_level, refittable=refittable,
                          weight_streaming_budget=_parse_bytes(weight_streaming_budget))
    plan = make_plan(manifest, chosen, parse_list(precision_list, PRECISIONS, "--precision"), options)
    if gpu_memory is not None:
        if not dry_run:
            raise InputError("--gpu-memory plans memory only with --dry-run.", "add --dry-run.")
        from uniref_deploy.engines.memory import format_memory, memory_plan

        plan = dataclasses.replace(plan, memory=memory_plan(plan, manifest.model, art_dir, gpu_memory))
    if dry_run:
        save_plan(plan, art_dir)
        if as_json:
            click.echo(plan.to_json())
            return
        click.echo(format_table(plan))
        if plan.memory is not None:
            click.echo("\n" + format_memory(plan.memory))
        click.echo("\npolygraphy commands:")
        for line in polygraphy_commands(plan, art_dir):
            click.echo(line)
        return

    from uniref_deploy.engines.build import BuildOptions, build_engines, check_build_environment

    reason = check_build_environment()
    if reason is not None:
        raise MissingDependencyError(f"Cannot build TensorRT engines: {reason}.",
                                     "`uniref-deploy build ART --dry-run` prints the plan and polygraphy commands.")
    if not plan.engines:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in plan.skipped)
        raise InputError(f"Nothing to build ({reasons}).")
    manifest = build_engines(art_dir, plan, BuildOptions(force=force))
    record = manifest.stage("build")
    names = {e.engine_file for e in plan.engines}
    engines = [e for e in manifest.engines if e.file in names]
    if as_json:
        click.echo(json.dumps({"engines": [dataclasses.asdict(e) for e in engines], "build": record.results}, indent=2))
        return
    for e in engines:
        p = e.provenance
        profiles = ",".join(Budget.from_pixels(b).name for b in e.budgets)
        click.echo(f"{e.file}  profiles {profiles}  {p['engine_bytes'] / 2**20:9.1f} MiB  {p['build_seconds']:7.1f} s  "
                   f"TensorRT {p['tensorrt_version']} sm {p['compute_capability']}")
    for s in plan.skipped:
        click.echo(f"skipped {s.name}: {s.reason}")
    click.echo(f"built {len(record.results['built'])}, reused {len(record.results['reused'])} "
               f"in {record.seconds:.1f} s")
