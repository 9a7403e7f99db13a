"""Resolve a MODEL argument: an artifact folder, a diffusers folder, or a preset name (built on demand)."""

from __future__ import annotations

import os
from pathlib import Path

from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.manifest import MANIFEST_NAME

PRESET_NAMES = ("tiny", "small")


def preset_cache_dir(name: str) -> Path:
    root = Path(os.environ.get("UNIREF_CACHE", Path.home() / ".cache" / "uniref-deploy"))
    return root / "presets" / name


def resolve_model(source: str) -> tuple[str, Path]:
    """Return ("artifacts" | "diffusers", path) for ``source``; presets are built into the cache once."""
    path = Path(source)
    if (path / MANIFEST_NAME).is_file():
        return "artifacts", path
    if (path / "model_index.json").is_file():
        return "diffusers", path
    if source in PRESET_NAMES and not path.exists():
        from uniref_deploy.presets import build_preset

        return "diffusers", build_preset(source, preset_cache_dir(source))
    if not path.exists():
        raise InputError(f"'{source}' does not exist.", f"pass a model folder, an artifact folder or one of {PRESET_NAMES}.")
    raise InputError(
        f"'{source}' is neither an artifact folder (manifest.json) nor a diffusers model folder (model_index.json).",
        "run `uniref-deploy preset tiny --out DIR` or `uniref-deploy export MODEL --out ART` first.",
    )
