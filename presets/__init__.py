"""Test and benchmark models built locally, without a model hub ("presets").

- ``seeded``: the ``tiny`` and ``small`` Qwen-Image-Edit(-Plus) component sets (random, seeded weights).
- ``real``: the published configs of Qwen-Image-Edit, -2509 and -2511 (kept under ``real_configs/``) at reduced
  depth, random weights, in the real folder layout (sharded bf16 safetensors).
- ``outliers``: activation outlier channels, as trained DiTs show them, injected into a seeded preset's DiT without
  changing its output (``build_preset(..., outliers=True)``, ``uniref-deploy preset small --outliers``).
"""

from .outliers import OutlierSpec, inject_outliers
from .seeded import PRESETS, build_preset, preset_parameter_counts, read_preset_record

__all__ = ["PRESETS", "OutlierSpec", "build_preset", "inject_outliers", "preset_parameter_counts", "read_preset_record"]
