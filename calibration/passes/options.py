"""``PassOptions``: the switches of the FP8 pass sequence, and that sequence in its fixed order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from uniref_deploy.export.graph_pass import GraphPass

from .fp8_activations import QuantizeActivationsFP8
from .fp8_weights import QuantizeWeightsFP8
from .fp16_storage import StoreWeightsFP16
from .opset import UpgradeOpset


@dataclass(frozen=True)
class PassOptions:
    """Args:
        per_channel (bool, default True): one weight scale per output channel (else per tensor).
        fp8_activations (bool, default True): Q/DQ the activations of the quantised layers.
        fp8_attention (bool, default False): Q/DQ both inputs of the attention q·kᵀ and p·v matmuls.
        fp16_storage (bool, default True): store the weights of the layers kept high-precision in fp16.
        opset (int, default 19): the minimum opset for float8 Q/DQ.
    """

    per_channel: bool = True
    fp8_activations: bool = True
    fp8_attention: bool = False
    fp16_storage: bool = True
    opset: int = 19


def fp8_passes(options: PassOptions, layers: Sequence[str], activation_targets: Sequence[tuple[str, int]],
               attention_targets: Sequence[tuple[str, int]], ranges: Mapping[str, float],
               dtypes: Mapping[str, np.dtype] | None = None) -> list[GraphPass]:
    """The passes in order: opset, weights, activations (+ attention), fp16 storage of the rest."""
    passes: list[GraphPass] = [UpgradeOpset(options.opset), QuantizeWeightsFP8(layers, options.per_channel)]
    targets = list(activation_targets) if options.fp8_activations else []
    if options.fp8_attention:
        targets += list(attention_targets)
    if targets:
        passes.append(QuantizeActivationsFP8(targets, ranges, dtypes))
    if options.fp16_storage:
        passes.append(StoreWeightsFP16())
    return passes
