"""`uniref-deploy compile MODEL|tiny|small --out ART`: the whole compile, with a closing summary table."""

from __future__ import annotations

import click

from uniref_deploy.runtime.precision import ENGINE_PREFERENCE
from uniref_deploy.tools.options import lora_options, parse_budgets, parse_list, parse_loras


@click.command("compile")
@click.argument("model")
@click.option("--out", "art_dir", type=click.Path(file_okay=False), required=True, help="Artifact folder.")
@click.option("--budgets", default="1024,1536,2048", show_default=True, help="Bucket sides to compile.")
@click.option("--precision", "precision_list", default="fp16", show_default=True,
              help="Engine precisions: fp16,bf16,fp8 (fp8 runs calibration).")
@click.option("--seed", type=int, default=0, show_default=True, help="Preset seed (when MODEL is a preset name).")
@click.option("--no-validate", is_flag=True, help="Skip export validation (the runtime check still runs).")
@click.option("--force", is_flag=True, help="Redo stages even when their inputs are unchanged.")
@click.option("--text-graphs/--no-text-graphs", default=True, show_default=True,
              help="Also export the prompt encoder (text_vision + text_encoder graphs, ART/text/).")
@lora_options
def command(model: str, art_dir: str, budgets: str, precision_list: str, seed: int, no_validate: bool,
            force: bool, text_graphs: bool, loras: tuple[str, ...], scheduler_config: str | None) -> None:
    """Preset (when named) -> ONNX export -> FP8 calibration (fp8) -> runtime check -> TensorRT engines/plan."""
    from pathlib import Path

    from uniref_deploy.tools.compile_job import compile_model, format_summary

    precisions = parse_list(precision_list, ENGINE_PREFERENCE, "--precision")
    manifest, rows = compile_model(model, art_dir, parse_budgets(budgets), precisions,
                                   say=lambda msg: click.echo(msg, err=True), seed=seed,
                                   validate=not no_validate, force=force, loras=parse_loras(loras),
                                   scheduler_config=Path(scheduler_config) if scheduler_config else None,
                                   text_graphs=text_graphs)
    click.echo(format_summary(rows, Path(art_dir)))
    click.echo(f"artifacts: {art_dir} (budgets {', '.join(b.name for b in manifest.budgets)})")
