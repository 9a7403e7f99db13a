"""Reusable click option groups shared by several verbs."""

from __future__ import annotations

import click

from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.manifest import TEXT_ENCODER_DTYPES
from uniref_deploy.runtime.packing import BUDGETS, POLICIES
from uniref_deploy.runtime.pipeline_classes import PIPELINE_CLASSES


def parse_budgets(text: str) -> tuple[int, ...]:
    """'1024,1536' -> (1024, 1536) sides; only the trained budgets are accepted."""
    try:
        sides = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise InputError(f"--budgets '{text}' is not a comma-separated list of sides.", "e.g. --budgets 1024,1536") from err
    bad = [s for s in sides if s not in BUDGETS]
    if bad or not sides:
        raise InputError(f"Unknown budget(s) {bad or text}.", f"choose from {', '.join(map(str, BUDGETS))}.")
    return sides


def parse_list(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise InputError(f"{flag} '{text}' has unknown value(s) {bad}.", f"choose from {', '.join(allowed)}.")
    return items


def edit_options(f):
    """Options of one edit request (shared by `edit` and `profile`)."""
    f = click.option("--budget", type=click.Choice([str(b) for b in BUDGETS]), default="1024", show_default=True,
                     help="Global pixel budget (side of the square area).")(f)
    f = click.option("--policy", type=click.Choice(POLICIES), default="self", show_default=True,
                     help="How references share the budget.")(f)
    f = click.option("--steps", type=click.IntRange(1, 1000), default=28, show_default=True,
                     help="Denoising steps.")(f)
    f = click.option("--cfg", "true_cfg_scale", type=float, default=4.0, show_default=True,
                     help="True CFG scale (used when a negative prompt is given).")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise.")(f)
    f = click.option("--width", type=click.IntRange(16, 16384), default=None, help="Output width (default: last reference's aspect at the budget).")(f)
    f = click.option("--height", type=click.IntRange(16, 16384), default=None, help="Output height.")(f)
    return f


def model_options(f):
    """How to serve the model (shared by `edit` and `export`): its pipeline class and text-encoder dtype."""
    f = click.option("--pipeline-class", type=click.Choice(sorted(PIPELINE_CLASSES)), default=None,
                     help="Serve the model as this diffusers class (default: model_index.json's, or the manifest's).")(f)
    f = click.option("--text-encoder-dtype", type=click.Choice(TEXT_ENCODER_DTYPES), default=None,
                     help="Text encoder dtype; auto = bfloat16 where the GPU/CPU supports it, else float32 "
                          "[default: auto, or the manifest's].")(f)
    return f
