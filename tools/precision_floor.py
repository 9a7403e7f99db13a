"""The accuracy floor of a low-precision pipeline, measured against a peer's own low-precision error.

A bf16 run of our runtime is judged the way a user would judge diffusers in torch bf16: over a whole denoising
trajectory (same references, embeddings and initial noise), the final latent's PSNR against the fp32 run and
the cosine of each step's velocity against the fp32 run's velocity at that step (each run follows its own
trajectory). ``floor_holds`` accepts ours when its error is at most ``factor`` times the peer's: RMSE (PSNR
lower by at most 20·log10(factor) dB) and 1 - cosine, both the mean over steps and the worst step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from uniref_deploy.runtime.backends.base import Backend
from uniref_deploy.runtime.compare import psnr
from uniref_deploy.runtime.graphs import DIT


class VelocityRecorder(Backend):
    """Wraps a DiT backend and keeps every velocity it returns (the pipeline's per-step DiT outputs)."""

    kind = "recorder"

    def __init__(self, inner: Backend):
        super().__init__(inner.name, inner.inputs, inner.outputs)
        self.inner, self.velocities = inner, []

    def _activate(self) -> None:
        self.inner.activate()

    def _deactivate(self) -> None:
        self.inner.deactivate()

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inner.infer(feeds)
        self.velocities.append(out["velocity"].copy())
        return out


def trajectory(pipe, **call) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run ``pipe(**call, output_type="latent")``; return the final packed latents and each DiT velocity."""
    recorder = VelocityRecorder(pipe.backends[DIT])
    pipe.backends[DIT] = recorder
    try:
        latents = pipe(**call, output_type="latent")
    finally:
        pipe.backends[DIT] = recorder.inner
    return np.asarray(latents, np.float32), recorder.velocities


@dataclass(frozen=True)
class TrajectoryError:
    """Error of a trajectory against a reference one: final-latent PSNR (peak = the reference's max |x|),
    and 1 - cosine of the per-step velocities (mean and worst)."""

    latent_psnr_db: float
    velocity_cosine_min: float
    velocity_one_minus_cos_mean: float

    @property
    def latent_rmse_rel(self) -> float:
        return 10.0 ** (-self.latent_psnr_db / 20.0)

    def to_dict(self) -> dict:
        return asdict(self)


def step_cosines(test: tuple[np.ndarray, list[np.ndarray]], ref: tuple[np.ndarray, list[np.ndarray]]) -> list[float]:
    """Cosine of each DiT call's velocity in ``test`` against the same call in ``ref`` (same number of calls)."""
    vt, vr = test[1], ref[1]
    if len(vt) != len(vr):
        raise ValueError(f"trajectories have {len(vt)} and {len(vr)} DiT calls")
    cos = []
    for a, b in zip(vt, vr, strict=True):
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        cos.append(float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64))))
    return cos


def trajectory_error(test: tuple[np.ndarray, list[np.ndarray]],
                     ref: tuple[np.ndarray, list[np.ndarray]]) -> TrajectoryError:
    """Compare ``test`` = (latents, velocities) against ``ref`` (same number of steps)."""
    cos = step_cosines(test, ref)
    peak = float(np.abs(ref[0]).max()) or 1.0
    return TrajectoryError(psnr(test[0], ref[0], peak), min(cos), float(np.mean([1.0 - c for c in cos])))


def floor_holds(ours: TrajectoryError, peer: TrajectoryError, factor: float = 1.5) -> dict[str, bool]:
    """Each criterion: ours within ``factor`` times the peer's error (a zero peer error is floored at 1e-12)."""
    return {
        "latent_psnr": ours.latent_psnr_db >= peer.latent_psnr_db - 20.0 * math.log10(factor),
        "velocity_cos_worst": 1.0 - ours.velocity_cosine_min <= factor * max(1.0 - peer.velocity_cosine_min, 1e-12),
        "velocity_cos_mean": ours.velocity_one_minus_cos_mean <= factor * max(peer.velocity_one_minus_cos_mean, 1e-12),
    }
