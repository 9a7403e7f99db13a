"""`uniref-deploy lora ART --lora FILE[:SCALE] ... | --clear`: swap the DiT's fused LoRAs without re-tracing."""

from __future__ import annotations

import click

from uniref_deploy.tools.options import parse_loras


@click.command("lora")
@click.argument("art_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]", help="LoRA to fuse (repeatable).")
@click.option("--clear", is_flag=True, help="Remove every fused LoRA (back to the base weights).")
def command(art_dir: str, loras: tuple[str, ...], clear: bool) -> None:
    """Rewrite the LoRA-affected weights of ART's DiT graphs; refittable engines are refitted, other DiT engines
    and FP8 graphs are dropped as stale."""
    from uniref_deploy.export.lora_swap import swap_loras
    from uniref_deploy.runtime.errors import InputError

    if clear == bool(loras):
        raise InputError("Give either --lora FILE[:SCALE] (repeatable) or --clear.", "see `uniref-deploy lora --help`.")
    manifest = swap_loras(art_dir, parse_loras(loras), progress=lambda msg: click.echo(msg, err=True))
    record = manifest.stage("lora")
    names = ", ".join(f"{r['file']}:{r['scale']:g}" for r in record.settings["loras"]) or "none"
    click.echo(f"{record.results['layers']} layer(s) rewritten in {record.seconds:.1f} s; LoRAs: {names}")
