"""`uniref-deploy preset NAME --out DIR`: write a seeded, randomly initialised model in diffusers format."""

from __future__ import annotations

import click


@click.command("preset")
@click.argument("name", type=click.Choice(["tiny", "small"]))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Initialisation seed.")
def command(name: str, out_dir: str, seed: int) -> None:
    """Build the `tiny` (seconds on CPU) or `small` (benchmark-sized) preset locally; no model hub needed."""
    from uniref_deploy.presets import build_preset, preset_parameter_counts

    path = build_preset(name, out_dir, seed=seed)
    counts = preset_parameter_counts(path)
    click.echo(f"preset '{name}' (seed {seed}) at {path}")
    for component, n in counts.items():
        click.echo(f"  {component:<14} {n:>14,d} parameters")
