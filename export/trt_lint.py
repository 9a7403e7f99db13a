"""TensorRT lint: ops TensorRT's ONNX parser lacks, float64 anywhere, static dims on dynamic axes.

The supported-op list is data taken from TensorRT 10.8's ``onnx-tensorrt`` operator support matrix
(docs/operators.md of the 10.8 release); ops outside the default ONNX domain are flagged unless listed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx

TRT_VERSION = "10.8"
TRT_SUPPORTED_OPS = frozenset(["Abs", "Acos", "Acosh", "Add", "AffineGrid", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Compress", "Concat", "ConcatFromSequence", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DFT", "DeformConv", "DepthToSpace", "DequantizeLinear", "Det", "Div", "Dropout", "DynamicQuantizeLinear", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HammingWindow", "HannWindow", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool", "LRN", "LSTM", "MatMul", "Max", "MaxPool", "MaxRoiPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Multinomial", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign", "Round", "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "SplitToSequence", "Sqrt", "Squeeze", "STFT", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unique", "Unsqueeze", "Upsample", "Where", "Xor", "RMSNormalization", "Attention"])
ALLOWED_CUSTOM_DOMAINS = {"trt": {"TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"}}


@dataclass
class LintReport:
    """Findings for one graph; truthy when TensorRT should parse it."""

    graph: str
    ops: dict[str, int] = field(default_factory=dict)
    unsupported_ops: list[str] = field(default_factory=list)
    float64: list[str] = field(default_factory=list)
    static_dynamic_axes: list[str] = field(default_factory=list)
    trt_version: str = TRT_VERSION

    def __bool__(self) -> bool:
        return not (self.unsupported_ops or self.float64 or self.static_dynamic_axes)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": bool(self)}


def lint_model(model: onnx.ModelProto, graph: str, dynamic_axes: dict[str, dict[int, str]]) -> LintReport:
    """Lint a loaded model (weights need not be loaded). ``dynamic_axes``: input/output name -> {axis: name}."""
    report = LintReport(graph)
    for node in _all_nodes(model.graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        report.ops[key] = report.ops.get(key, 0) + 1
        supported = (node.op_type in TRT_SUPPORTED_OPS if node.domain in ("", "ai.onnx")
                     else node.op_type in ALLOWED_CUSTOM_DOMAINS.get(node.domain, set()))
        if not supported and key not in report.unsupported_ops:
            report.unsupported_ops.append(key)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.DOUBLE:
                report.float64.append(f"node {node.name} attribute {attr.name}")
            if node.op_type == "Cast" and attr.name == "to" and attr.i == onnx.TensorProto.DOUBLE:
                report.float64.append(f"Cast to double at {node.name}")
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.DOUBLE:
            report.float64.append(f"initializer {init.name}")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE:
            report.float64.append(f"value {value.name}")
        axes = dynamic_axes.get(value.name, {})
        dims = value.type.tensor_type.shape.dim
        for axis, name in axes.items():
            if axis < len(dims) and not dims[axis].dim_param:
                report.static_dynamic_axes.append(f"{value.name}[{axis}] ({name}) is fixed to {dims[axis].dim_value}")
    report.ops = dict(sorted(report.ops.items()))
    return report


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)
