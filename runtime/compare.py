"""Numeric comparison as data: one truthy ``CompareResult`` per tensor, tolerances per name with a default."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class CompareResult:
    """Errors of ``actual`` against ``expected``; truthy when within tolerance.

    ``rel_max`` is the max abs error divided by the expected tensor's max magnitude (its scale).
    """

    name: str
    max_abs: float
    mean_abs: float
    p99_abs: float
    scale: float
    rel_max: float
    cosine: float
    tolerance: float
    metric: str = "rel_max"

    def __bool__(self) -> bool:
        value = getattr(self, self.metric)
        return bool(np.isfinite(value) and value <= self.tolerance)

    @property
    def passed(self) -> bool:
        return bool(self)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        state = "ok" if self else "FAIL"
        return (f"{self.name}: {state} {self.metric}={getattr(self, self.metric):.3g} (tolerance {self.tolerance:g}); "
                f"max_abs={self.max_abs:.3g} scale={self.scale:.3g} cosine={self.cosine:.6f}")


def compare(name: str, actual: np.ndarray, expected: np.ndarray, tolerance: float = 1e-4,
            metric: str = "rel_max") -> CompareResult:
    """Compare two arrays of equal shape (computed in float64)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return CompareResult(name, np.inf, np.inf, np.inf, 0.0, np.inf, 0.0, tolerance, metric)
    diff = np.abs(a - e)
    scale = float(np.abs(e).max()) if e.size else 0.0
    denom = float(np.linalg.norm(a) * np.linalg.norm(e))
    cosine = float((a * e).sum() / denom) if denom > 0 else float(np.array_equal(a, e))
    max_abs = float(diff.max()) if diff.size else 0.0
    return CompareResult(
        name=name,
        max_abs=max_abs,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        p99_abs=float(np.quantile(diff, 0.99)) if diff.size else 0.0,
        scale=scale,
        rel_max=max_abs / scale if scale > 0 else max_abs,
        cosine=cosine,
        tolerance=tolerance,
        metric=metric,
    )


def psnr(actual: np.ndarray, expected: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical inputs)."""
    mse = float(np.mean((np.asarray(actual, np.float64) - np.asarray(expected, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)

