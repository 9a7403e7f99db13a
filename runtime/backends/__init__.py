"""Backends: one interface (`Backend.infer`) over torch, ONNX Runtime and TensorRT."""
