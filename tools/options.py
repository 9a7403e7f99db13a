"""Reusable click option groups shared by several verbs."""

from __future__ import annotations

import click

from uniref_deploy.runtime.budget import TRAINED_SIDES, Budget
from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.manifest import TEXT_ENCODER_DTYPES
from uniref_deploy.runtime.packing import POLICIES
from uniref_deploy.runtime.pipeline_classes import PIPELINE_CLASSES

BUDGET_HELP = "a side (1024), a pixel count (300000px, or any number above 8192) or a size (640x480)"


def parse_budgets(text: str, trained_only: bool = True) -> tuple[Budget, ...]:
    """'1024,1536' -> the budgets, in order (each item as in ``Budget.parse``).

    Args:
        text (str): comma-separated budgets.
        trained_only (bool, default True): accept only the trained budgets (what export and engines compile).

    Raises:
        InputError: an item does not parse, or is not a trained budget when ``trained_only``.
    """
    budgets = tuple(Budget.parse(x) for x in text.split(",") if x.strip())
    bad = [b.name for b in budgets if trained_only and not b.is_trained]
    if bad or not budgets:
        raise InputError(f"Unknown budget(s) {bad or text!r}.", f"choose from {', '.join(map(str, TRAINED_SIDES))}.")
    return budgets


class BudgetParam(click.ParamType):
    """A click option value read with ``Budget.parse`` (a bad value is a usage error, exit 2)."""

    name = "budget"

    def convert(self, value, param, ctx) -> Budget:
        if isinstance(value, Budget):
            return value
        try:
            return Budget.parse(value)
        except InputError as err:
            self.fail(err.message, param, ctx)


def parse_list(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise InputError(f"{flag} '{text}' has unknown value(s) {bad}.", f"choose from {', '.join(allowed)}.")
    return items


def edit_options(f):
    """Options of one edit request (shared by `edit` and `profile`)."""
    f = click.option("--budget", type=BudgetParam(), default="1024", show_default=True,
                     help=f"Global pixel budget: {BUDGET_HELP}; artifacts run any budget up to their largest "
                          "compiled one (TensorRT engines: exactly a compiled one).")(f)
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


def lora_options(f):
    """``--lora FILE[:SCALE]`` (repeatable) and ``--scheduler-config FILE`` (shared by `export` and `compile`)."""
    f = click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
                     help="LoRA (.safetensors; diffusers/PEFT or kohya keys) fused into the DiT before export; "
                          "repeatable; SCALE defaults to 1.0.")(f)
    f = click.option("--scheduler-config", type=click.Path(dir_okay=False), default=None,
                     help="scheduler_config.json replacing the model's in the manifest (e.g. Lightning's).")(f)
    return f


def parse_loras(texts: tuple[str, ...]) -> tuple:
    """``--lora`` values -> LoraSpecs (missing file, non-numeric or non-finite scale: InputError)."""
    from uniref_deploy.export.lora import LoraSpec

    return tuple(LoraSpec.parse(t) for t in texts)
