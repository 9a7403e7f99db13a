"""`uniref-deploy calibrate ART`: FP8 (E4M3) Q/DQ DiT graph from the fp32 export, with an accuracy report."""

from __future__ import annotations

import click

from uniref_deploy.runtime.packing import MIN_REFERENCE_SIDE


@click.command("calibrate")
@click.argument("art_dir", type=click.Path(file_okay=False))
@click.option("--precision", type=click.Choice(["fp8", "int8"]), default="fp8", show_default=True,
              help="fp8: E4M3 Q/DQ for TensorRT; int8: per-channel int8 weights, static and dynamic activations "
                   "measured (CPU, TensorRT without FP8).")
@click.option("--activations", type=click.Choice(["auto", "static", "dynamic"]), default="auto", show_default=True,
              help="int8 only: activation scales per tensor (static), per token at run time (dynamic), or measure "
                   "both and keep the more accurate.")
@click.option("--smoothquant/--no-smoothquant", "smooth", default=None,
              help="int8 static only: SmoothQuant every tensor / none (default: measure with and without it on the "
                   "tensors with outliers).")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="int8: SmoothQuant migration strength.")
@click.option("--keep", multiple=True, help="int8: module-name prefix to keep fp32 (repeatable).")
@click.option("--images", type=click.Path(file_okay=False), default=None,
              help="Folder of reference images for calibration (default: built-in procedural set).")
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True, help="Calibration samples.")
@click.option("--fp8-attention", is_flag=True, help="Also FP8 the attention q·kᵀ and p·v matmuls.")
@click.option("--per-channel/--per-tensor", "per_channel", default=None,
              help="Weight scales per output channel or per tensor (default: measure both, keep the better).")
@click.option("--steps", "eval_steps", type=click.IntRange(min=0), default=28, show_default=True,
              help="Denoising steps of the accuracy report (0 skips it).")
@click.option("--max-side", type=click.IntRange(min=MIN_REFERENCE_SIDE), default=512, show_default=True,
              help="Pack calibration samples into at most SIDE x SIDE pixels (keeps CPU sequences short).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration draws.")
@click.option("--force", is_flag=True, help="Recalibrate even when the inputs are unchanged.")
def command(art_dir: str, precision: str, activations: str, smooth: bool | None, alpha: float,
            keep: tuple[str, ...], images: str | None, samples: int, fp8_attention: bool, per_channel: bool | None,
            eval_steps: int, max_side: int, seed: int, force: bool) -> None:
    """Calibrate the DiT of ART to FP8 (onnx/dit.fp8.onnx, calibration/report.{json,png}) or INT8
    (onnx/dit.int8.onnx)."""
    if precision == "int8":
        from uniref_deploy.calibration.int8 import Int8Options, calibrate_int8

        options8 = Int8Options(activations=activations, smooth=smooth, alpha=alpha, keep=keep, samples=samples,
                               eval_steps=eval_steps, max_pixels=max_side * max_side, seed=seed, force=force)
        manifest = calibrate_int8(art_dir, options8, progress=lambda msg: click.echo(msg, err=True))
        info = manifest.graph("dit", "int8").info
        for mode, figs in info.get("measured", {}).items():
            for name, fig in figs.items():
                if isinstance(fig, dict):
                    click.echo(f"{mode} {name}: cosine min {fig['cosine_min']:.5f} mean {fig['cosine_mean']:.5f}, "
                               f"latent PSNR {fig['latent_psnr_db']} dB")
        click.echo(f"dit.int8: {info.get('candidate')} ({info.get('activations')})")
        return
    from uniref_deploy.calibration.fp8 import CalibrationOptions, calibrate_fp8
    from uniref_deploy.runtime.budget import Budget

    options = CalibrationOptions(samples=samples, images=images, fp8_attention=fp8_attention,
                                 per_channel=per_channel, seed=seed, eval_steps=eval_steps,
                                 max_pixels=Budget.from_side(max_side).pixels, force=force)
    manifest = calibrate_fp8(art_dir, options, progress=lambda msg: click.echo(msg, err=True))
    info = manifest.graph("dit", "fp8").info
    for name, fig in info.get("figures", {}).items():
        click.echo(f"{name}: cosine min {fig['cosine_min']:.5f} mean {fig['cosine_mean']:.5f}, "
                   f"latent PSNR {fig['latent_psnr_db']} dB, image PSNR {fig['image_psnr_db']} dB")
    sizes = info.get("sizes", {})
    click.echo(f"{manifest.graph('dit', 'fp8').file}: {info.get('weight_scales')} scales, "
               f"weights {sizes.get('fp8_weight_bytes', 0) / 2**20:.2f} MiB"
               + (f" ({sizes['fp8_over_fp16_weights']:.2f}x fp16)" if "fp8_over_fp16_weights" in sizes else ""))
