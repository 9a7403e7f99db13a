"""`uniref-deploy profile ART`: per-stage latency percentiles, host overhead and a per-op breakdown."""

from __future__ import annotations

import click

# openvino:PRECISION gives that backend its own precision (auto: the measured choice per graph)
BACKENDS = ("ort", "torch", "trt", "openvino", "openvino:auto", "openvino:fp32", "openvino:bf16", "openvino:int8")


@click.command("profile")
@click.argument("art", type=click.Path(exists=True, file_okay=False))
@click.option("--backend", "backends", default="ort", show_default=True,
              help="Comma-separated backends: ort, torch (the source model), trt, openvino[:auto|fp32|bf16|int8].")
@click.option("--budgets", default=None, help="Budget sides, e.g. 1024,1536 (default: every compiled budget).")
@click.option("--refs", default="1,2", show_default=True, help="Reference counts to profile, e.g. 1,2,4.")
@click.option("--steps", type=click.IntRange(1, 1000), default=8, show_default=True, help="Denoising steps.")
@click.option("--warmup", type=click.IntRange(0, 100), default=1, show_default=True, help="Untimed runs each.")
@click.option("--runs", type=click.IntRange(1, 1000), default=3, show_default=True, help="Timed runs each.")
@click.option("--width", type=click.IntRange(16, 16384), default=None, help="Output width.")
@click.option("--height", type=click.IntRange(16, 16384), default=None, help="Output height.")
@click.option("--policy", type=click.Choice(("self", "proportional", "per-image")), default="self",
              show_default=True, help="How references share the budget.")
@click.option("--precision", default="fp32", show_default=True, help="Graph precision (ort/trt).")
@click.option("--op-profile/--no-op-profile", default=True, show_default=True,
              help="One extra edit under ONNX Runtime's profiler for the per-op table.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Report folder (default ART/reports/profile).")
def command(art, backends, budgets, refs, steps, warmup, runs, width, height, policy, precision, op_profile, out):
    """Profile edits on ART: stage latency p50/p90/p99 per bucket and reference count, host overhead, per-op
    time; writes profile.json, profile.md and PNG plots."""
    from pathlib import Path

    from uniref_deploy.runtime.errors import InputError
    from uniref_deploy.tools.options import parse_budgets, parse_list
    from uniref_deploy.tools.profiling import ProfileOptions, run_profile

    try:
        ref_counts = tuple(int(x) for x in refs.split(",") if x.strip())
    except ValueError as err:
        raise InputError(f"--refs '{refs}' is not a comma-separated list of integers.", "e.g. --refs 1,2,4") from err
    if not ref_counts or min(ref_counts) < 0:
        raise InputError(f"--refs '{refs}' must list reference counts >= 0.")
    opts = ProfileOptions(backends=parse_list(backends, BACKENDS, "--backend"),
                          budgets=parse_budgets(budgets) if budgets else None, refs=ref_counts, steps=steps,
                          warmup=warmup, runs=runs, width=width, height=height, policy=policy, precision=precision,
                          op_profile=op_profile)
    out = Path(out) if out else Path(art) / "reports" / "profile"
    report = run_profile(art, opts, out, say=lambda m: click.echo(m, err=True))
    click.echo((out / "profile.md").read_text().split("## Per-op")[0].rstrip())
    click.echo(f"\nwrote {out / 'profile.json'}, {out / 'profile.md'}, " + ", ".join(report["plots"]))
