"""Parity of runtime/scheduler.py with diffusers' FlowMatchEulerDiscreteScheduler as the edit-plus pipeline drives it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from uniref_deploy.runtime.scheduler import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    FlowMatchEulerConfig,
    FlowMatchEulerScheduler,
    calculate_shift,
)

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus  # noqa: E402

TOL = 0.0  # bit-for-bit under numpy 1 and numpy 2 (each against diffusers in the same environment)
# target tokens: 1024², 1536², 2048² and odd sizes (base anchor, 768x1024, 1376x1376)
TARGET_TOKENS = [256, 3072, 4096, 7396, 9216, 16384]
STEPS = [4, 28, 50]


def _diffusers_run(
    cfg: dict, steps: int, target_tokens: int, latents: np.ndarray, velocities: list[np.ndarray]
):
    """Schedule and Euler loop exactly as QwenImageEditPlusPipeline.__call__ does them."""
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    mu = edit_plus.calculate_shift(
        target_tokens,
        sched.config.get("base_image_seq_len", 256),
        sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5),
        sched.config.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / steps, steps)
    timesteps, _ = edit_plus.retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
    sched.set_begin_index(0)
    x = torch.from_numpy(latents)
    trajectory = []
    for t, v in zip(timesteps, velocities, strict=True):
        x = sched.step(torch.from_numpy(v), t, x, return_dict=False)[0]
        trajectory.append(x.numpy())
    return mu, sched.sigmas.numpy(), timesteps.numpy(), trajectory


def _inputs(steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((1, 32, 64)).astype(np.float32)
    return latents, [rng.standard_normal(latents.shape).astype(np.float32) for _ in range(steps)]


def _maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.mark.parametrize("target_tokens", TARGET_TOKENS)
@pytest.mark.parametrize("steps", STEPS)
def test_qwen_schedule_and_steps_match_diffusers(steps, target_tokens):
    latents, velocities = _inputs(steps)
    mu, ref_sigmas, ref_timesteps, ref_traj = _diffusers_run(
        QWEN_IMAGE_SCHEDULER_CONFIG, steps, target_tokens, latents, velocities
    )
    sched = FlowMatchEulerScheduler(FlowMatchEulerConfig.from_dict(QWEN_IMAGE_SCHEDULER_CONFIG))
    sched.set_timesteps(steps, target_tokens)
    assert sched.mu == mu
    assert sched.sigmas.dtype == sched.timesteps.dtype == np.float32
    assert sched.sigmas.shape == (steps + 1,) and sched.timesteps.shape == (steps,)
    assert _maxdiff(sched.sigmas, ref_sigmas) <= TOL
    assert _maxdiff(sched.timesteps, ref_timesteps) <= TOL
    x = latents
    for i, (v, ref) in enumerate(zip(velocities, ref_traj, strict=True)):
        x = sched.step(v, i, x)
        assert x.dtype == np.float32
        assert _maxdiff(x, ref) <= TOL, f"step {i}"


@pytest.mark.parametrize(
    "overrides",
    [
        {"time_shift_type": "linear"},
        {"use_dynamic_shifting": False, "shift": 3.0},
        {"shift_terminal": None},
    ],
    ids=["linear", "static-shift", "no-terminal"],
)
def test_other_supported_options_match_diffusers(overrides):
    cfg = dict(QWEN_IMAGE_SCHEDULER_CONFIG, **overrides)
    latents, velocities = _inputs(8, seed=3)
    _, ref_sigmas, ref_timesteps, ref_traj = _diffusers_run(cfg, 8, 5000, latents, velocities)
    sched = FlowMatchEulerScheduler(FlowMatchEulerConfig.from_dict(cfg))
    sched.set_timesteps(8, 5000)
    assert _maxdiff(sched.sigmas, ref_sigmas) <= TOL
    assert _maxdiff(sched.timesteps, ref_timesteps) <= TOL
    x = latents
    for i, v in enumerate(velocities):
        x = sched.step(v, i, x)
    assert _maxdiff(x, ref_traj[-1]) <= TOL


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("target_tokens", [256, 4096, 16384])
def test_single_step_is_finite_where_diffusers_gives_nan(target_tokens):
    """diffusers' terminal stretch divides 0 by 0 for N=1; the port skips the stretch instead."""
    latents, velocities = _inputs(1)
    _, ref_sigmas, ref_timesteps, _ = _diffusers_run(
        QWEN_IMAGE_SCHEDULER_CONFIG, 1, target_tokens, latents, velocities
    )
    assert np.isnan(ref_sigmas[0]) and np.isnan(ref_timesteps[0])  # documents the upstream behaviour
    sched = FlowMatchEulerScheduler()
    sched.set_timesteps(1, target_tokens)
    np.testing.assert_array_equal(sched.sigmas, np.array([1.0, 0.0], np.float32))
    np.testing.assert_array_equal(sched.timesteps, np.array([1000.0], np.float32))
    np.testing.assert_array_equal(sched.step(velocities[0], 0, latents), latents - velocities[0])


def test_single_step_without_terminal_matches_diffusers():
    cfg = dict(QWEN_IMAGE_SCHEDULER_CONFIG, shift_terminal=None)
    latents, velocities = _inputs(1)
    _, ref_sigmas, ref_timesteps, ref_traj = _diffusers_run(cfg, 1, 4096, latents, velocities)
    sched = FlowMatchEulerScheduler(FlowMatchEulerConfig.from_dict(cfg))
    sched.set_timesteps(1, 4096)
    assert _maxdiff(sched.sigmas, ref_sigmas) <= TOL
    assert _maxdiff(sched.timesteps, ref_timesteps) <= TOL
    assert _maxdiff(sched.step(velocities[0], 0, latents), ref_traj[0]) <= TOL


def test_calculate_shift_matches_pipeline():
    for tokens in TARGET_TOKENS + [1, 100000]:
        assert calculate_shift(tokens, 256, 8192, 0.5, 0.9) == edit_plus.calculate_shift(
            tokens, 256, 8192, 0.5, 0.9
        )


def test_custom_sigmas_match_diffusers():
    sigmas = [1.0, 0.9, 0.6, 0.35, 0.1]
    ref = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    ref.set_timesteps(sigmas=sigmas, mu=calculate_shift(4096, 256, 8192, 0.5, 0.9))
    sched = FlowMatchEulerScheduler()
    sched.set_timesteps(5, 4096, sigmas=sigmas)
    assert _maxdiff(sched.sigmas, ref.sigmas.numpy()) <= TOL
    with pytest.raises(ValueError, match="5 sigmas"):
        sched.set_timesteps(5, 4096, sigmas=sigmas[:3])


def test_config_file_and_unknown_keys(tmp_path, caplog):
    path = tmp_path / "scheduler_config.json"
    data = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.34.0", "new_knob": 1}
    path.write_text(json.dumps({**QWEN_IMAGE_SCHEDULER_CONFIG, **data}))
    sched = FlowMatchEulerScheduler.from_config_file(path)
    assert sched.config == FlowMatchEulerConfig()
    assert "new_knob" in caplog.text and "_diffusers_version" not in caplog.text


@pytest.mark.parametrize(
    "key, value",
    [
        ("use_karras_sigmas", True),
        ("use_exponential_sigmas", True),
        ("use_beta_sigmas", True),
        ("stochastic_sampling", True),
        ("invert_sigmas", True),
        ("time_shift_type", "cosine"),
        ("_class_name", "FlowMatchHeunDiscreteScheduler"),
    ],
)
def test_unsupported_options_are_rejected(key, value):
    with pytest.raises(ValueError, match=key):
        FlowMatchEulerConfig.from_dict({**QWEN_IMAGE_SCHEDULER_CONFIG, key: value})


def test_step_argument_errors():
    sched = FlowMatchEulerScheduler()
    x = np.zeros((1, 4, 8), np.float32)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(x, 0, x)
    sched.set_timesteps(4, 4096)
    with pytest.raises(TypeError, match="integer index"):
        sched.step(x, float(sched.timesteps[0]), x)
    with pytest.raises(TypeError, match="integer index"):
        sched.step(x, sched.timesteps[0], x)
    with pytest.raises(IndexError):
        sched.step(x, 4, x)
    with pytest.raises(ValueError, match="shape"):
        sched.step(x[:, :2], 0, x)
    assert sched.step(x.astype(np.float16), np.int64(3), x.astype(np.float16)).dtype == np.float32
