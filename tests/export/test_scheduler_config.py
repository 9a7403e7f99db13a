"""``--scheduler-config``: a few-step scheduler config replaces the model's in the manifest, bad files fail early."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from uniref_deploy.export.scheduler_config import read_scheduler_config
from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.scheduler import FlowMatchEulerConfig, FlowMatchEulerScheduler

# the FlowMatchEuler settings Qwen-Image-Lightning publishes for its 4/8-step LoRAs
LIGHTNING = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": math.log(3),
             "invert_sigmas": False, "max_image_seq_len": 8192, "max_shift": math.log(3), "num_train_timesteps": 1000,
             "shift": 1.0, "shift_terminal": None, "stochastic_sampling": False, "time_shift_type": "exponential",
             "use_beta_sigmas": False, "use_dynamic_shifting": True, "use_exponential_sigmas": False,
             "use_karras_sigmas": False}


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(data))
    return path


def test_lightning_config_is_read_and_drives_the_runtime_scheduler(tmp_path):
    config = read_scheduler_config(_write(tmp_path, LIGHTNING))
    assert "_class_name" not in config and config["max_shift"] == pytest.approx(math.log(3))
    scheduler = FlowMatchEulerScheduler(FlowMatchEulerConfig.from_dict(config))
    scheduler.set_timesteps(4, image_seq_len=1024)
    assert len(scheduler.timesteps) == 4


@pytest.mark.parametrize("data", [[1, 2], {"shift": float("nan")}, {"_class_name": "DDIMScheduler"}])
def test_bad_scheduler_config_is_one_line(tmp_path, data):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        read_scheduler_config(path)
    assert "\n" not in str(err.value)


def test_export_plan_takes_the_scheduler_config(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    from uniref_deploy.export.exporter import ExportOptions, _plan

    run = _plan(tiny_model_dir, tmp_path / "art", ExportOptions(scheduler_config=_write(tmp_path, LIGHTNING)),
                lambda msg: None)
    assert run.manifest.model.scheduler["max_shift"] == pytest.approx(math.log(3))
    plain = _plan(tiny_model_dir, tmp_path / "art", ExportOptions(), lambda msg: None)
    assert plain.inputs_hash != run.inputs_hash  # skip-on-rerun sees the change
