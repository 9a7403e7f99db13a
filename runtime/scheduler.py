"""Flow-matching Euler scheduler for Qwen-Image(-Edit), in numpy.

Follows ``FlowMatchEulerDiscreteScheduler`` (``diffusers/schedulers/scheduling_flow_match_euler_discrete.py``)
as driven by ``QwenImageEditPlusPipeline`` (``diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py``:
``calculate_shift``, default sigmas ``linspace(1, 1/N, N)``, ``mu`` from the TARGET token count), diffusers
0.42.1. Only the deterministic Euler path with dynamic (or static) shift and the terminal stretch is ported.

Precision follows diffusers step by step: the sigma schedule is float32 numpy (python scalars such as
``exp(mu)`` rounded to float32 on entry), timesteps are float32 ``sigma * num_train_timesteps``, and ``step`` does
the float32 mul-then-add Euler update. The terminal stretch's scale keeps diffusers' mixed scalar expression, whose
precision numpy 1 and numpy 2 promote differently (float64 vs float32). Results match diffusers bit-for-bit on
float32 inputs under either numpy.

One deliberate difference: when the last shifted sigma is 1 (a single step with the default schedule), diffusers'
terminal stretch divides 0 by 0 and yields NaN sigmas and timesteps. Here the stretch is skipped for that case,
giving sigmas ``[1, 0]`` and timestep ``[1000]``.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .errors import ConfigError

logger = logging.getLogger(__name__)

#: ``scheduler/scheduler_config.json`` of Qwen-Image and Qwen-Image-Edit(-2509/-2511).
QWEN_IMAGE_SCHEDULER_CONFIG: dict = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

_DIFFUSERS_CLASS = "FlowMatchEulerDiscreteScheduler"
# Options diffusers has but this port does not implement: each must stay False.
_UNSUPPORTED_FLAGS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",
    "invert_sigmas",
)


@dataclass(frozen=True)
class FlowMatchEulerConfig:
    """Scheduler options, named as in diffusers' ``scheduler_config.json``; defaults are Qwen-Image's.

    Attributes:
        num_train_timesteps: timestep = sigma * this.
        shift: static shift, used only when ``use_dynamic_shifting`` is False.
        use_dynamic_shifting: shift by ``mu`` from the target token count (Qwen: True).
        base_shift, max_shift: ``mu`` at ``base_image_seq_len`` and ``max_image_seq_len`` target tokens.
        base_image_seq_len, max_image_seq_len: the two anchors of the linear ``mu`` rule (extrapolated beyond).
        shift_terminal: stretch the schedule so its last sigma equals this (None or 0 disables).
        time_shift_type: "exponential" (``e^mu / (e^mu + 1/t - 1)``) or "linear" (``mu / (mu + 1/t - 1)``).
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, stochastic_sampling, invert_sigmas:
            diffusers options that this port rejects unless False.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 0.9
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    shift_terminal: float | None = 0.02
    time_shift_type: str = "exponential"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    stochastic_sampling: bool = False
    invert_sigmas: bool = False

    def __post_init__(self) -> None:
        for key in _UNSUPPORTED_FLAGS:
            if getattr(self, key):
                raise ConfigError(
                    f"scheduler option {key}=True is not implemented by runtime/scheduler.py; "
                    f"only the deterministic Euler flow-matching schedule is ported. Set {key} to false."
                )
        if self.time_shift_type not in ("exponential", "linear"):
            raise ConfigError(
                f"scheduler option time_shift_type={self.time_shift_type!r} is not supported; "
                "expected 'exponential' or 'linear'."
            )
        if self.num_train_timesteps <= 0:
            raise ConfigError(
                f"scheduler option num_train_timesteps must be positive, got {self.num_train_timesteps}."
            )
        if self.base_image_seq_len == self.max_image_seq_len:
            raise ConfigError(
                "scheduler options base_image_seq_len and max_image_seq_len must differ, both are "
                f"{self.base_image_seq_len}."
            )
        if self.shift_terminal is not None and not 0.0 <= self.shift_terminal < 1.0:
            raise ConfigError(f"scheduler option shift_terminal must be in [0, 1), got {self.shift_terminal}.")

    @classmethod
    def from_dict(cls, d: Mapping) -> FlowMatchEulerConfig:
        """Build from a ``scheduler_config.json`` mapping.

        Metadata keys (``_class_name``, ``_diffusers_version``) and unknown keys are ignored (unknown ones with a
        warning). Missing keys take the Qwen-Image defaults.

        Raises:
            ConfigError: ``_class_name`` names another scheduler, or an unsupported option is enabled; the message
                names the key (an ``InputError`` and a ``ValueError``).
        """
        class_name = d.get("_class_name")
        if class_name is not None and class_name != _DIFFUSERS_CLASS:
            raise ConfigError(
                f"scheduler config _class_name={class_name!r} is not supported; expected {_DIFFUSERS_CLASS!r}."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in known and not str(k).startswith("_"))
        if unknown:
            logger.warning("ignoring scheduler config keys not used by this port: %s", ", ".join(unknown))
        return cls(**{k: v for k, v in d.items() if k in known})


def calculate_shift(
    image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float
) -> float:
    """``mu`` as a linear function of the target token count through (base_seq_len, base_shift) and
    (max_seq_len, max_shift), evaluated in the same order as the Qwen-Image pipelines."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return image_seq_len * slope + intercept


class FlowMatchEulerScheduler:
    """Deterministic Euler sampler over a shifted flow-matching sigma schedule.

    Usage: ``set_timesteps(N, target_tokens)``, then for ``i in range(N)``: run the DiT at ``timesteps[i]`` and
    ``sample = step(velocity, i, sample)``.
    """

    def __init__(self, config: FlowMatchEulerConfig | None = None):
        self.config = config if config is not None else FlowMatchEulerConfig()
        self.timesteps: np.ndarray = np.zeros(0, np.float32)
        self.sigmas: np.ndarray = np.zeros(0, np.float32)
        self.mu: float | None = None

    @classmethod
    def from_config_file(cls, path: str | Path) -> FlowMatchEulerScheduler:
        """Load a diffusers ``scheduler_config.json``."""
        with open(path, encoding="utf-8") as fh:
            return cls(FlowMatchEulerConfig.from_dict(json.load(fh)))

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def _time_shift(self, mu: float, t: np.ndarray) -> np.ndarray:
        # the shape exponent diffusers passes here is 1.0, an exact identity, so it is left out
        odds = np.float32(1.0) / t - np.float32(1.0)
        if self.config.time_shift_type == "exponential":
            e_mu = np.float32(math.exp(mu))
            return e_mu / (e_mu + odds)
        m = np.float32(mu)
        return m / (m + odds)

    def _stretch_to_terminal(self, t: np.ndarray, shift_terminal: float) -> np.ndarray:
        one_minus = np.float32(1.0) - t
        if one_minus[-1] == 0:
            logger.warning(
                "last sigma is 1 (a single-step schedule?): skipping the shift_terminal stretch, which would "
                "divide by zero (diffusers returns NaN here)."
            )
            return t
        # Written as diffusers writes it, so numpy's own promotion decides the precision of the scale: a
        # float32 scalar over a python float is float64 under numpy 1 (value-based casting, rounded to float32
        # when it divides the array) and float32 under numpy 2 (NEP 50). Both reproduce diffusers in the same
        # environment; forcing either dtype is off by one ulp under the other numpy.
        scale = one_minus[-1] / (1.0 - shift_terminal)
        return np.float32(1.0) - one_minus / scale

    def set_timesteps(
        self, num_inference_steps: int, image_seq_len: int, sigmas: Sequence[float] | None = None
    ) -> None:
        """Build the schedule for one generation.

        Args:
            num_inference_steps: number of denoising steps N (>= 1).
            image_seq_len: number of TARGET image tokens (references excluded); sets ``mu`` for dynamic shifting.
            sigmas: optional custom N unshifted sigmas in (0, 1]; default ``linspace(1, 1/N, N)``.

        Sets ``timesteps`` (float32 [N]), ``sigmas`` (float32 [N+1], ending in 0) and ``mu``.

        Raises:
            ValueError: N < 1, or ``sigmas`` of another length.
        """
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        if sigmas is None:
            base = np.linspace(1.0, 1.0 / n, n)  # float64, as the pipeline builds it
        else:
            base = np.asarray(sigmas, dtype=np.float64)
            if base.shape != (n,):
                raise ValueError(f"expected {n} sigmas (one per step), got shape {base.shape}.")
        s = base.astype(np.float32)

        cfg = self.config
        if cfg.use_dynamic_shifting:
            self.mu = calculate_shift(
                image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
            )
            s = self._time_shift(self.mu, s)
        else:
            self.mu = None
            shift = np.float32(cfg.shift)
            s = shift * s / (np.float32(1.0) + np.float32(cfg.shift - 1.0) * s)
        if cfg.shift_terminal:
            s = self._stretch_to_terminal(s, cfg.shift_terminal)

        s = s.astype(np.float32, copy=False)
        self.timesteps = s * np.float32(cfg.num_train_timesteps)
        self.sigmas = np.concatenate([s, np.zeros(1, np.float32)])

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        """One Euler step from ``sigmas[step_index]`` to ``sigmas[step_index + 1]``.

        Args:
            model_output: predicted velocity, same shape as ``sample``.
            step_index: integer position in ``timesteps`` (not the timestep value).
            sample: current latents.

        Returns:
            float32 ``sample + (sigma_next - sigma) * model_output`` (both inputs upcast to float32 first).

        Raises:
            TypeError: ``step_index`` is not an integer (e.g. a timestep value was passed).
            IndexError: ``step_index`` outside ``[0, N)``.
            RuntimeError: ``set_timesteps`` was not called.
            ValueError: shapes differ.
        """
        if isinstance(step_index, (bool, np.bool_)) or not isinstance(step_index, numbers.Integral):
            raise TypeError(
                f"step() takes the integer index of the step (0..N-1), got {type(step_index).__name__} "
                f"{step_index!r}; pass the loop index i, not timesteps[i]."
            )
        if self.num_inference_steps == 0:
            raise RuntimeError("call set_timesteps() before step().")
        i = int(step_index)
        if not 0 <= i < self.num_inference_steps:
            raise IndexError(f"step_index {i} is outside 0..{self.num_inference_steps - 1}.")
        out = np.asarray(model_output, dtype=np.float32)
        x = np.asarray(sample, dtype=np.float32)
        if out.shape != x.shape:
            raise ValueError(f"model_output shape {out.shape} differs from sample shape {x.shape}.")
        dt = self.sigmas[i + 1] - self.sigmas[i]  # float32 scalar
        return x + dt * out
