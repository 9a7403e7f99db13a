"""`uniref-deploy compare ART --backends ort,torch`: identical inputs through each backend, compared."""

from __future__ import annotations

import click

# openvino:PRECISION gives that backend its own precision (auto: the measured choice per graph)
BACKENDS = ("ort", "torch", "trt", "openvino", "openvino:auto", "openvino:fp32", "openvino:bf16", "openvino:int8")


@click.command("compare")
@click.argument("art", type=click.Path(exists=True, file_okay=False))
@click.option("--backends", default="ort,torch", show_default=True,
              help="Comma-separated backends (ort, torch, trt, openvino[:auto|fp32|bf16|int8]); the first is the "
                   "reference the others are compared against.")
@click.option("--budget", type=click.Choice(("1024", "1536", "2048")), default="1024", show_default=True,
              help="Pixel budget (side).")
@click.option("--refs", default="1,2", show_default=True, help="Reference counts (one layout each).")
@click.option("--steps", type=click.IntRange(1, 1000), default=4, show_default=True, help="End-to-end steps.")
@click.option("--width", type=click.IntRange(16, 16384), default=None, help="Output width.")
@click.option("--height", type=click.IntRange(16, 16384), default=None, help="Output height.")
@click.option("--precision", default="fp32", show_default=True, help="Graph precision (ort/trt).")
@click.option("--tolerance", "tolerances", multiple=True,
              help="VALUE (default rel_max) or NAME=VALUE, NAME a tensor (dit.velocity, vae_encoder.latent, "
                   "vae_decoder.image, image.psnr_db: minimum dB) or LAYOUT/TENSOR; repeatable. "
                   "Defaults: fp32 rel_max 1e-3, PSNR >= 40 dB.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def command(art, backends, budget, refs, steps, width, height, precision, tolerances, as_json):
    """Run the same inputs through each backend; per-tensor max-abs, relative error, cosine and the final
    image's PSNR against the first backend; exit 1 when any result misses its tolerance."""
    import json

    from uniref_deploy.runtime.errors import CheckFailed, InputError
    from uniref_deploy.tools.comparing import format_table, parse_tolerances, run_compare
    from uniref_deploy.tools.options import parse_list

    try:
        ref_counts = tuple(int(x) for x in refs.split(",") if x.strip())
    except ValueError as err:
        raise InputError(f"--refs '{refs}' is not a comma-separated list of integers.") from err
    report = run_compare(art, parse_list(backends, BACKENDS, "--backends"), int(budget), ref_counts or (1,), steps,
                         parse_tolerances(tolerances, precision), precision=precision, width=width, height=height,
                         say=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_table(report))
    if not report.passed:
        backend, first = report.failures[0]
        raise CheckFailed(f"{len(report.failures)} of {len(report.rows)} comparisons failed; first: {backend} "
                          f"{first.describe() if hasattr(first, 'describe') else first.to_dict()}")
