"""Probes of how runtimes execute an INT8 graph: integer kernels on ONNX Runtime's optimised CPU graph, int8
FullyConnected nodes in OpenVINO's compiled CPU model, float matmuls left reading constant weights."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import onnx

from uniref_deploy.export.graph_pass import initializer_map
from uniref_deploy.runtime._lazy import is_available, require

__all__ = ["INTEGER_OPS", "float_weight_matmuls", "integer_kernels", "openvino_kernels"]

INTEGER_OPS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm",
               "MatMulNBits")


def float_weight_matmuls(model: onnx.ModelProto) -> int:
    """MatMul/Gemm nodes that read a 2-D float32 constant weight (what quantisation must have replaced)."""
    inits = initializer_map(model.graph)
    count = 0
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
        if w is not None and len(w.dims) == 2 and w.data_type == onnx.TensorProto.FLOAT:
            count += 1
    return count


def integer_kernels(path: Path) -> dict:
    """Op counts of ONNX Runtime's optimised CPU graph of ``path``: integer matmuls and float constant matmuls."""
    ort = require("onnxruntime", extra="onnx")
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable fused graph
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        # weights beside the graph, so models over protobuf's 2 GB save too; only the op types are read back
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    ops = collections.Counter(n.op_type for n in optimized.graph.node)
    return {"integer_ops": {op: ops[op] for op in INTEGER_OPS if ops[op]},
            "integer_matmuls": sum(ops[op] for op in INTEGER_OPS), "float_weight_matmuls": float_weight_matmuls(optimized)}


def openvino_kernels(path: Path) -> dict | None:
    """FullyConnected nodes of OpenVINO's compiled CPU model of ``path`` by runtime precision (None: no OpenVINO)."""
    if not is_available("openvino"):
        return None
    import openvino

    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    counts = collections.Counter(
        str(op.get_rt_info()["runtimePrecision"].astype(str)) for op in compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "FullyConnected")
    return {"fully_connected": dict(counts), "int8": counts["i8"] + counts["u8"]}
