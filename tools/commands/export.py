"""`uniref-deploy export MODEL --out ART`: ONNX graphs, TensorRT lint and validation, recorded in the manifest."""

from __future__ import annotations

import click

from uniref_deploy.tools.options import lora_options, model_options, parse_budgets, parse_list, parse_loras


@click.command("export")
@click.argument("model")
@click.option("--out", "art_dir", type=click.Path(file_okay=False), required=True, help="Artifact folder.")
@click.option("--budgets", default="1024", show_default=True, help="Bucket sides to compile, e.g. 1024,1536,2048.")
@click.option("--dtypes", default=None,
              help="Graph precisions: fp32,fp16,bf16 [default: fp32,fp16; with --lean: fp16, the DiT gets only these].")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (>= 17).")
@click.option("--no-validate", is_flag=True,
              help="Skip the full ONNX Runtime vs torch validation (the batch-1/2 smoke validation still runs).")
@click.option("--validation-area", type=click.IntRange(64 * 64, None), default=None,
              help="Pack the full validation's layouts at this many pixels instead of each bucket's (memory bound).")
@click.option("--force", is_flag=True, help="Re-export even when the inputs are unchanged.")
@click.option("--ort-fusions/--no-ort-fusions", default=True, show_default=True,
              help="Also write onnx/dit.ort.onnx: the fp32 DiT with ONNX Runtime fusions (MHA, RMSNorm, GELU).")
@click.option("--lean/--no-lean", default=None,
              help="Stream the DiT from its safetensors checkpoint instead of loading it [default: lean when the "
                   "DiT in fp32 exceeds 25% of RAM].")
@click.option("--consume-shards", is_flag=True,
              help="With --lean: DELETE each checkpoint shard once streamed (for disks that cannot hold both copies).")
@click.option("--text-graphs/--no-text-graphs", default=True, show_default=True,
              help="Also export the prompt encoder (text_vision + text_encoder graphs, ART/text/).")
@model_options
@lora_options
def command(model: str, art_dir: str, budgets: str, dtypes: str | None, opset: int, no_validate: bool,
            validation_area: int | None, force: bool, ort_fusions: bool, lean: bool | None,
            consume_shards: bool, text_graphs: bool, pipeline_class: str | None, text_encoder_dtype: str | None,
            loras: tuple[str, ...], scheduler_config: str | None) -> None:
    """Export MODEL (diffusers folder or preset name) to ONNX under ART, validated against torch."""
    from pathlib import Path

    from uniref_deploy.export.exporter import PRECISIONS, ExportOptions, export_onnx
    from uniref_deploy.export.lean_rule import choose_lean
    from uniref_deploy.tools.model_source import resolve_model

    kind, path = resolve_model(model)
    if kind != "diffusers":
        from uniref_deploy.runtime.errors import InputError

        raise InputError(f"'{model}' is already an artifact folder.", "pass the diffusers model folder to export.")
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    lean = choose_lean(path, lean, say)
    default = "fp16" if lean else "fp32,fp16"
    options = ExportOptions(budgets=parse_budgets(budgets), dtypes=parse_list(dtypes or default, PRECISIONS, "--dtypes"),
                            opset=opset, validate=not no_validate, validation_area=validation_area, force=force,
                            ort_fusions=ort_fusions, lean=lean, consume_shards=consume_shards,
                            pipeline_class=pipeline_class, text_encoder_dtype=text_encoder_dtype or "auto",
                            loras=parse_loras(loras), scheduler_config=scheduler_config and Path(scheduler_config),
                            text_graphs=text_graphs)
    manifest = export_onnx(path, art_dir, options, progress=say)
    click.echo(f"{len(manifest.graphs)} graph(s) in {art_dir}/manifest.json")
