"""``--scheduler-config FILE``: a scheduler_config.json replacing the model's in the manifest (few-step recipes)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from uniref_deploy.runtime.errors import InputError

# FlowMatchEulerDiscreteScheduler options the numpy scheduler reads; anything else is kept but unused
NUMERIC_KEYS = ("shift", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "num_train_timesteps")


def read_scheduler_config(path: str | os.PathLike) -> dict:
    """The JSON object of ``path`` without diffusers' private ``_…`` keys.

    Raises:
        InputError: the file is missing, not JSON, not an object, has a non-finite numeric option, or the runtime's
            FlowMatchEuler scheduler rejects it.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"Scheduler config '{path}' is not a readable JSON file ({err}).",
                         "pass a diffusers scheduler_config.json.") from err
    if not isinstance(data, dict):
        raise InputError(f"Scheduler config '{path}' is not a JSON object.", "pass a diffusers scheduler_config.json.")
    bad = [k for k in NUMERIC_KEYS if k in data and not (isinstance(data[k], (int, float)) and math.isfinite(data[k]))]
    if bad:
        raise InputError(f"Scheduler config '{path}': {bad[0]}={data[bad[0]]!r} is not a finite number.",
                         "fix the value in the file.")
    from uniref_deploy.runtime.scheduler import FlowMatchEulerConfig

    try:
        FlowMatchEulerConfig.from_dict(data)  # the runtime's scheduler must accept it
    except (ValueError, TypeError) as err:
        raise InputError(f"Scheduler config '{path}' is not usable: {err}",
                         "pass a FlowMatchEulerDiscreteScheduler config.") from err
    return {k: v for k, v in data.items() if not k.startswith("_")}
