"""Graph passes that turn the fp32 DiT graph into an FP8 (E4M3) Q/DQ graph.

One pass per file, each a small ``GraphPass`` subclass; ``PassOptions`` holds the switches and ``fp8_passes``
their fixed order.
"""

from __future__ import annotations

from uniref_deploy.export.graph_pass import GraphPass

from .fp8_activations import QuantizeActivationsFP8
from .fp8_weights import QuantizeWeightsFP8
from .fp16_storage import StoreWeightsFP16
from .opset import UpgradeOpset
from .options import PassOptions, fp8_passes

__all__ = [
    "GraphPass",
    "PassOptions",
    "QuantizeActivationsFP8",
    "QuantizeWeightsFP8",
    "StoreWeightsFP16",
    "UpgradeOpset",
    "fp8_passes",
]
