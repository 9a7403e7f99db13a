"""SmoothQuant-style scale migration for static per-tensor INT8: move activation outliers into the weights.

A per-tensor int8 scale is set by the largest channel, so a few outlier channels (as trained DiTs show in their
MLP and attention inputs) leave the other channels a handful of levels. Per input channel ``j`` of a tensor that
feeds linear layers, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``W_j``: row ``j`` of every consumer's
``[in, out]`` weight); the graph computes ``(X / s) @ (diag(s) W)``, the same product with flatter activations.
Applied only to tensors whose channel absmax is lopsided (largest over median above ``outlier_ratio``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

FLOOR = 1e-5  # keeps s finite for dead channels


def outlier_ratio(channel_amax: np.ndarray) -> float:
    """Largest channel absmax over the median one (1 for a flat tensor)."""
    med = float(np.median(channel_amax))
    return float(channel_amax.max()) / max(med, FLOOR)


def smoothing_factors(channel_amax: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """``s`` for one activation tensor and the ``[in, out]`` weights of the layers it feeds."""
    w_amax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    a = np.maximum(channel_amax.astype(np.float64), FLOOR)
    w = np.maximum(w_amax.astype(np.float64), FLOOR)
    return (a**alpha / w ** (1.0 - alpha)).astype(np.float32)


def plan_smoothing(channel_amax: Mapping[str, np.ndarray], weights: Mapping[str, Sequence[np.ndarray]],
                   alpha: float, ratio: float) -> dict[str, np.ndarray]:
    """Tensor -> ``s`` for every tensor whose outlier ratio exceeds ``ratio`` (``ratio`` 0 smooths every tensor)."""
    return {t: smoothing_factors(a, weights[t], alpha) for t, a in channel_amax.items()
            if t in weights and a.ndim == 1 and outlier_ratio(a) > ratio}


def smoothed_amax(channel_amax: Mapping[str, np.ndarray], smooth: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-tensor absmax after dividing by ``s`` (unsmoothed tensors: their plain absmax)."""
    return {t: float((a / smooth[t]).max()) if t in smooth else float(a.max()) for t, a in channel_amax.items()}
