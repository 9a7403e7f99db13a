"""Load-time checks of a diffusers model folder: is it an edit model this runtime serves, and as which class?

Run by ``ModelConfig.from_diffusers_dir`` for every backend, so an unsupported checkpoint fails at load with one
line instead of late in a trace or with a raw ``NotImplementedError``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import InputError
from .pipeline_classes import EDIT_COMPONENTS, EDIT_PLUS, PIPELINE_CLASSES, REFUSED

logger = logging.getLogger(__name__)

# Transformer config flags whose non-default value changes the model in a way the exported graph does not have.
_UNSUPPORTED_FLAGS = {
    "guidance_embeds": "guidance-distilled models (guidance_embeds: true)",
    "use_additional_t_cond": "an additional timestep condition (use_additional_t_cond: true)",
    "use_layer3d_rope": "layered 3D RoPE (use_layer3d_rope: true)",
}


def resolve_pipeline_class(root: Path, model_index: dict, requested: str | None = None) -> str:
    """The pipeline class to serve the folder ``root`` as.

    ``requested`` (the ``--pipeline-class`` option) wins; else ``model_index``'s ``_class_name`` when it is a
    supported edit class. A Qwen-Image text-to-image or Layered class is refused; any other class name whose
    folder has the edit components loads as Edit-Plus with a warning.

    Raises:
        InputError: an unknown ``requested`` class, a refused class, or an unknown class without the components.
    """
    supported = ", ".join(sorted(PIPELINE_CLASSES))
    if requested is not None:
        if requested not in PIPELINE_CLASSES:
            raise InputError(f"Unknown pipeline class '{requested}'.", f"use one of {supported}.")
        return requested
    name = str(model_index.get("_class_name", ""))
    if name in PIPELINE_CLASSES:
        return name
    if name in REFUSED:
        raise InputError(f"'{root}' is {REFUSED[name]} ({name}), not an image-edit model.",
                         f"pass a Qwen-Image-Edit folder ({supported}).")
    missing = [c for c in EDIT_COMPONENTS if c not in model_index]
    if missing:
        raise InputError(f"'{root}' has pipeline class '{name or '(none)'}' without the edit components {missing}.",
                         f"pass a Qwen-Image-Edit folder ({supported}).")
    logger.warning("'%s' has pipeline class '%s'; serving it as %s (set --pipeline-class to choose)",
                   root, name or "(none)", EDIT_PLUS)
    return EDIT_PLUS


def check_transformer_config(root: Path, transformer: dict, vae: dict) -> None:
    """Refuse transformer configs the exported graphs and the runtime do not implement.

    Raises:
        InputError: a flag of ``_UNSUPPORTED_FLAGS`` is set, the patch size is not 2, or the channel counts do
            not match the VAE (``in_channels == 4 * z_dim``, ``out_channels == z_dim``).
    """
    where = f"'{root / 'transformer' / 'config.json'}'"
    hint = "only Qwen-Image-Edit transformers are supported."
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if transformer.get(flag):
            raise InputError(f"{where}: {what} are not supported.", hint)
    patch = transformer.get("patch_size", 2)
    if patch != 2:
        raise InputError(f"{where}: patch_size {patch} is not supported (expected 2).", hint)
    z = vae.get("z_dim")
    in_ch = transformer.get("in_channels", 64)
    out_ch = transformer.get("out_channels", 16) or in_ch  # diffusers: None means in_channels
    if z is None:
        raise InputError(f"'{root / 'vae' / 'config.json'}' has no z_dim.", "is the checkpoint complete?")
    if in_ch != 4 * z:
        raise InputError(f"{where}: in_channels {in_ch} is not 4 x the VAE's z_dim {z} (2x2 patches).", hint)
    if out_ch != z:
        raise InputError(f"{where}: out_channels {out_ch} is not the VAE's z_dim {z}.", hint)
