"""`uniref-deploy preset NAME --out DIR`: write a seeded, randomly initialised model in diffusers format."""

from __future__ import annotations

import click

from uniref_deploy.presets import PRESETS
from uniref_deploy.presets.real import REAL_MODELS
from uniref_deploy.runtime.errors import InputError


@click.command("preset")
@click.argument("name", type=click.Choice([*PRESETS, *REAL_MODELS]))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Initialisation seed.")
@click.option("--outliers", is_flag=True, help="Give the DiT's attention/MLP inputs a few outlier channels, as "
              "trained DiTs have (same output; harder to quantize). tiny and small only.")
def command(name: str, out_dir: str, seed: int, outliers: bool) -> None:
    """Build `tiny` (seconds on CPU), `small` (benchmark-sized) or a published Qwen-Image-Edit config at one
    layer (real widths and folder layout, random weights); no model hub needed."""
    from uniref_deploy.presets import build_preset, preset_parameter_counts

    if name in REAL_MODELS:
        if outliers:
            raise InputError(f"--outliers applies to the seeded presets only, not '{name}'.",
                             f"use one of {', '.join(PRESETS)}, or drop --outliers.")
        from uniref_deploy.presets.real import build_real_preset

        path = build_real_preset(name, out_dir, seed=seed)
    else:
        path = build_preset(name, out_dir, seed=seed, outliers=outliers)
    counts = preset_parameter_counts(path)
    click.echo(f"preset '{name}' (seed {seed}{', outliers' if outliers else ''}) at {path}")
    for component, n in counts.items():
        click.echo(f"  {component:<14} {n:>14,d} parameters")
