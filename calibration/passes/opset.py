"""``UpgradeOpset``: raise the default-domain opset import so float8 QuantizeLinear/DequantizeLinear are legal."""

from __future__ import annotations

import onnx

from uniref_deploy.export.graph_pass import GraphPass

MIN_IR_VERSION = 9  # float8 types need IR 9


class UpgradeOpset(GraphPass):
    """Raise the ai.onnx opset import to ``target`` (float8 Q/DQ needs 19).

    Before: ``opset_import {"": 18}``, ir_version 8
    After:  ``opset_import {"": 19}``, ir_version >= 9

    Only the import changes: every op the exporter emits at opset 18 has the same schema at 19, except
    Q/DQ-family, Cast and Pad/Resize variants whose 19 versions only add types. Returns 1 when bumped, else 0.
    """

    name = "upgrade_opset"

    def __init__(self, target: int = 19):
        self.target = target

    def apply(self, model: onnx.ModelProto) -> int:
        default = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if default is not None and default.version >= self.target:
            return 0
        if default is None:
            model.opset_import.append(onnx.helper.make_opsetid("", self.target))
        else:
            default.version = self.target
        model.ir_version = max(model.ir_version, MIN_IR_VERSION)
        return 1
