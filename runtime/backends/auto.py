"""``backend="auto"``: the fastest backend installed for this machine, by a rule taken from measurements.

The rule, in order (figures: ``docs/benchmarks/README.md``, "CPU fast path", ``benchmarks/openvino_cpu.py``):

1. ``trt`` when the artifacts hold engines and TensorRT imports (the GPU path).
2. ``ort`` when ONNX Runtime has its CUDA provider (a GPU without engines).
3. ``openvino`` when it imports on a CPU with native bf16 (AMX or AVX-512 BF16): its bf16 DiT step is the
   fastest CPU option measured (ahead of ONNX Runtime fp32 and of diffusers in torch bf16).
4. ``openvino`` when ONNX Runtime is not installed (an ``[openvino]``-only install).
5. ``ort`` otherwise: without native bf16 OpenVINO runs f32, and its f32 DiT step (1.1-1.3x faster than ONNX
   Runtime on the portable graph in the same run) is within the 1.14-1.23x that ONNX Runtime's fused graph gains
   over the portable one: a tie, so the default stays the backend the export validates.
"""

from __future__ import annotations

from .._lazy import is_available
from ..manifest import Manifest


def _ort_has_cuda() -> bool:
    if not is_available("onnxruntime"):
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def choose_backend(manifest: Manifest) -> str:
    """The backend name ``Pipeline.from_artifacts(backend="auto")`` uses for ``manifest`` on this machine."""
    if manifest.engines and is_available("tensorrt"):
        return "trt"
    if _ort_has_cuda():
        return "ort"
    if is_available("openvino"):
        from .openvino import native_bf16

        if native_bf16() or not is_available("onnxruntime"):
            return "openvino"
    return "ort"
