"""`uniref-deploy export MODEL --out ART`: ONNX graphs, TensorRT lint and validation, recorded in the manifest."""

from __future__ import annotations

import click

from uniref_deploy.tools.options import model_options, parse_budgets, parse_list


@click.command("export")
@click.argument("model")
@click.option("--out", "art_dir", type=click.Path(file_okay=False), required=True, help="Artifact folder.")
@click.option("--budgets", default="1024", show_default=True, help="Bucket sides to compile, e.g. 1024,1536,2048.")
@click.option("--dtypes", default="fp32,fp16", show_default=True, help="Graph precisions: fp32,fp16,bf16.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (>= 17).")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs torch validation.")
@click.option("--force", is_flag=True, help="Re-export even when the inputs are unchanged.")
@click.option("--ort-fusions/--no-ort-fusions", default=True, show_default=True,
              help="Also write onnx/dit.ort.onnx: the fp32 DiT with ONNX Runtime fusions (MHA, RMSNorm, GELU).")
@model_options
def command(model: str, art_dir: str, budgets: str, dtypes: str, opset: int, no_validate: bool, force: bool,
            ort_fusions: bool, pipeline_class: str | None, text_encoder_dtype: str | None) -> None:
    """Export MODEL (diffusers folder or preset name) to ONNX under ART, validated against torch."""
    from uniref_deploy.export.exporter import PRECISIONS, ExportOptions, export_onnx
    from uniref_deploy.tools.model_source import resolve_model

    options = ExportOptions(budgets=parse_budgets(budgets), dtypes=parse_list(dtypes, PRECISIONS, "--dtypes"),
                            opset=opset, validate=not no_validate, force=force,
                            ort_fusions=ort_fusions, pipeline_class=pipeline_class,
                            text_encoder_dtype=text_encoder_dtype or "auto")
    kind, path = resolve_model(model)
    if kind != "diffusers":
        from uniref_deploy.runtime.errors import InputError

        raise InputError(f"'{model}' is already an artifact folder.", "pass the diffusers model folder to export.")
    manifest = export_onnx(path, art_dir, options, progress=lambda msg: click.echo(msg, err=True))
    click.echo(f"{len(manifest.graphs)} graph(s) in {art_dir}/manifest.json")
