"""`uniref-deploy edit MODEL --image A --image B --prompt TEXT -o OUT.png`: one edit, with a progress bar."""

from __future__ import annotations

import click

from uniref_deploy.tools.options import edit_options, model_options


@click.command("edit")
@click.argument("model")
@click.option("--image", "images", multiple=True, type=click.Path(), help="Reference image (repeat, in order).")
@click.option("--prompt", required=True, help="Edit instruction.")
@click.option("--negative-prompt", default=None, help="Negative prompt; enables true CFG when --cfg > 1.")
@edit_options
@model_options
@click.option("--backend", type=click.Choice(["auto", "torch", "ort", "trt", "openvino"]), default="auto",
              show_default=True, help="Backend (torch for model folders; ort/trt/openvino for artifact folders).")
@click.option("--precision", default=None, help="DiT precision for artifact folders (default: fp32 on ort, fastest "
              "built on trt, the measured choice per graph on openvino).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="CPU inference threads (ort/openvino; default: the runtime's choice).")
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Output PNG.")
def command(model, images, prompt, negative_prompt, budget, policy, steps, true_cfg_scale, seed, width, height,
            backend, precision, threads, out_path, pipeline_class, text_encoder_dtype) -> None:
    """Edit with MODEL (artifact folder, diffusers folder, or preset name `tiny`/`small`)."""
    from tqdm import tqdm

    from uniref_deploy.runtime.fileio import atomic_path
    from uniref_deploy.runtime.images import load_images
    from uniref_deploy.runtime.pipeline import Pipeline
    from uniref_deploy.tools.model_source import resolve_model

    refs = load_images(images)  # fail fast on bad files, before any model loads
    kind, path = resolve_model(model)
    if kind == "artifacts":
        options = {"threads": threads} if threads else {}
        pipe = Pipeline.from_artifacts(path, backend=backend, precision=precision, pipeline_class=pipeline_class,
                                       text_encoder_dtype=text_encoder_dtype, **options)
    else:
        pipe = Pipeline.from_pretrained(path, backend="torch" if backend == "auto" else backend,
                                        pipeline_class=pipeline_class, text_encoder_dtype=text_encoder_dtype or "auto")
    bar = None

    def progress(i: int, n: int, dt: float) -> None:
        nonlocal bar  # created at the first step, so a request rejected before denoising prints only its error
        if bar is None:
            bar = tqdm(total=n, desc="denoising", unit="step", leave=False)
        bar.update(1)

    try:
        out = pipe(prompt, image=refs, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
                   num_inference_steps=steps, budget=int(budget), policy=policy, width=width, height=height,
                   seed=seed, callback=progress)
    finally:
        if bar is not None:
            bar.close()
    with atomic_path(out_path) as tmp:
        out.save(tmp, format="PNG")
    layout = pipe.last_layout
    click.echo(f"wrote {out_path} ({out.width}x{out.height}; {len(refs)} reference(s), "
               f"{layout.num_image_tokens} image tokens, {pipe.last_times.total:.1f} s)")
