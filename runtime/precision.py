"""Graph precisions: their names, which stage makes each, and the numeric limits the stages work against."""

from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")  # every DiT precision a manifest may list
EXPORT_PRECISIONS = ("fp32", "fp16", "bf16")  # written by `export` (fp8 and int8 come from `calibrate`)
VAE_PRECISIONS = ("fp32", "fp16")  # the VAE graphs are exported at these only
ENGINE_PREFERENCE = ("fp16", "bf16", "fp8", "int8", "fp32")  # fastest first: what TensorRT picks when none is named
VAE_ENGINE_PREFERENCE = ("fp16", "fp32")

FP16_MAX = 65504.0  # largest finite float16
E4M3_MAX = 448.0  # largest finite float8 E4M3 (fn): the FP8 scale is absmax / E4M3_MAX
INT8_MAX = 127.0  # symmetric int8 range (-127..127): the INT8 scale is absmax / INT8_MAX
INT8_QDQ_VARIANT = "qdq"  # GraphSpec.variant of the static int8 Q/DQ DiT kept for TensorRT beside a dynamic one
