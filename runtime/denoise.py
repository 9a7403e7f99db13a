"""The denoising loop shared by the edit pipeline and the FP8 accuracy report.

One Euler trajectory over a DiT backend: at each timestep the target latents are concatenated with the
(fixed) reference tokens, the DiT predicts a velocity for every call of ``static_feeds`` (one call, or two for
true CFG: conditional then unconditional), only the target tokens' velocity is kept, CFG combines the two and
the scheduler steps the latents.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .backends.base import Backend
from .scheduler import FlowMatchEulerScheduler

StepCallback = Callable[[int, int, float], None]  # (step index, total steps, seconds of this step)


@dataclass
class DenoiseResult:
    """The final packed latents [1, S_target, 4z] and what the loop measured.

    Attributes:
        latents: the latents after the last step.
        dit_seconds: seconds of the DiT call(s) per step.
        scheduler_seconds: seconds spent in CFG and the scheduler, all steps together.
        velocities: the (guided) velocity of every step when asked for, else empty.
    """

    latents: np.ndarray
    dit_seconds: list[float] = field(default_factory=list)
    scheduler_seconds: float = 0.0
    velocities: list[np.ndarray] = field(default_factory=list)


def cfg_combine(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """True CFG with diffusers' norm rescale: the guided velocity keeps the conditional one's per-token norm."""
    comb = uncond + scale * (cond - uncond)
    cond_norm = np.linalg.norm(cond, axis=-1, keepdims=True)
    comb_norm = np.linalg.norm(comb, axis=-1, keepdims=True)
    return (comb * (cond_norm / comb_norm)).astype(np.float32)


def denoise(dit: Backend, static_feeds: Sequence[dict[str, np.ndarray]], latents: np.ndarray,
            reference_tokens: Sequence[np.ndarray], scheduler: FlowMatchEulerScheduler,
            true_cfg_scale: float = 1.0, keep_velocities: bool = False,
            callback: StepCallback | None = None) -> DenoiseResult:
    """Run every timestep of ``scheduler`` (``set_timesteps`` already called).

    Args:
        dit (Backend): the DiT graph.
        static_feeds (Sequence[dict]): the feeds that stay fixed over the loop (text, mask, RoPE tables, ...):
            one dict, or two (conditional, unconditional) for true CFG.
        latents (np.ndarray): initial target latents [1, S_target, 4z] (float32).
        reference_tokens (Sequence[np.ndarray]): packed reference latents [1, S_ref_i, 4z], in order.
        scheduler (FlowMatchEulerScheduler): the scheduler, its timesteps set.
        true_cfg_scale (float, default 1.0): CFG scale, used when two static feeds are given.
        keep_velocities (bool, default False): also return each step's velocity.
        callback (StepCallback | None): called after each step with (index, total, seconds).

    Returns:
        DenoiseResult: final latents and timings.
    """
    result = DenoiseResult(latents.astype(np.float32))
    n_target = latents.shape[1]
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        t_step = time.perf_counter()
        model_in = np.concatenate([result.latents, *reference_tokens], axis=1) if reference_tokens else result.latents
        timestep = np.full((1,), t / 1000.0, dtype=np.float32)
        preds = [dit.infer({**s, "hidden_states": model_in, "timestep": timestep})["velocity"][:, :n_target]
                 for s in static_feeds]
        result.dit_seconds.append(time.perf_counter() - t_step)
        t0 = time.perf_counter()
        velocity = cfg_combine(preds[0], preds[1], true_cfg_scale) if len(preds) > 1 else preds[0]
        if keep_velocities:
            result.velocities.append(velocity)
        result.latents = scheduler.step(velocity, i, result.latents)
        result.scheduler_seconds += time.perf_counter() - t0
        if callback is not None:
            callback(i, total, time.perf_counter() - t_step)
    return result
