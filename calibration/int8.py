"""``calibrate_int8``: the INT8 DiT for CPUs (ONNX Runtime, OpenVINO): ``onnx/dit.int8.onnx`` from the fp32 export.

Weights are stored as int8 per output channel; activations are quantised dynamically (one scale per tensor per
call, ONNX Runtime's DynamicQuantizeLinear), which needs no ranges and keeps accuracy on CPU. The layers the FP8
path keeps high-precision (``calibration/layers.HIGH_PRECISION``: embedders, ``norm_out``, ``proj_out``) stay
fp32. The stage checks that ONNX Runtime's optimised graph runs every quantised layer as an integer kernel
(no float MatMul/Gemm reading a constant weight beyond the kept layers) and measures the accuracy over a whole
denoising run with the FP8 path's report (``calibration/report.bucket_accuracy``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from uniref_deploy.runtime._lazy import require
from uniref_deploy.runtime.backends.ort import OrtBackend
from uniref_deploy.runtime.errors import CalibrationError
from uniref_deploy.runtime.fileio import atomic_path, sha256_file, sha256_json
from uniref_deploy.runtime.graphs import DIT, VAE_DECODER
from uniref_deploy.runtime.manifest import GraphSpec, Manifest, StageRecord

from . import dataset as ds
from .layers import find_layers, split_layers
from .passes.base import initializer_map
from .report import bucket_accuracy

logger = logging.getLogger(__name__)

INT8_FILE = "onnx/dit.int8.onnx"
STAGE = "calibrate_int8"
INTEGER_OPS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Int8Options:
    """Args:
        eval_steps (int, default 28): denoising steps of the accuracy report (0 skips it).
        max_pixels (int, default 512*512): packing budget cap of the report's edit (CPU-sized sequence).
        seed (int, default 0): seed of the report's noise and prompt.
        force (bool, default False): re-quantise even when the inputs are unchanged.
    """

    eval_steps: int = 28
    max_pixels: int = 512 * 512
    seed: int = 0
    force: bool = False

    def settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "force"}


def float_weight_matmuls(model: onnx.ModelProto) -> int:
    """MatMul/Gemm nodes that read a 2-D float32 constant weight (what quantisation must have replaced)."""
    inits = initializer_map(model.graph)
    count = 0
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
        if w is not None and len(w.dims) == 2 and w.data_type == onnx.TensorProto.FLOAT:
            count += 1
    return count


def excluded(high) -> list[str]:
    """Node names the quantizer must skip: ONNX Runtime's dynamic quantizer first splits a Gemm into
    ``<name>_MatMul`` + ``<name>_Add`` and matches the exclusion list on the split names."""
    return [name for ly in high for name in ((ly.node, f"{ly.node}_MatMul") if ly.op == "Gemm" else (ly.node,))]


def integer_kernels(path: Path) -> dict:
    """Op counts of ONNX Runtime's optimised CPU graph of ``path``: integer matmuls and float constant matmuls."""
    ort = require("onnxruntime", extra="onnx")
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable fused graph
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath)
    ops = collections.Counter(n.op_type for n in optimized.graph.node)
    return {"integer_ops": {op: ops[op] for op in INTEGER_OPS if ops[op]},
            "integer_matmuls": sum(ops[op] for op in INTEGER_OPS), "float_weight_matmuls": float_weight_matmuls(optimized)}


def calibrate_int8(art_dir, options: Int8Options, progress: Progress | None = None) -> Manifest:
    """Quantise the fp32 DiT of ``art_dir`` to INT8 and record it (``dit``/``int8``) in the manifest.

    Raises:
        ManifestError: the artifacts lack the fp32 DiT or it was damaged.
        CalibrationError: quantisation left float matmuls in quantised layers, or the graph fails to load.
    """
    quantize_dynamic = require("onnxruntime.quantization", extra="onnx").quantize_dynamic
    quant_type = require("onnxruntime.quantization", extra="onnx").QuantType
    start = time.perf_counter()
    art = Path(art_dir)
    manifest = Manifest.load(art)
    fp32 = manifest.graph(DIT, "fp32")
    manifest.verify_files(art, (fp32.key,))
    inputs_sha = sha256_json({"dit": fp32.sha256, "options": options.settings(), "scheme": "dynamic-v1"})
    record, out = manifest.stage(STAGE), art / INT8_FILE
    if (not options.force and record is not None and record.inputs_sha256 == inputs_sha
            and manifest.has_graph(DIT, "int8") and out.is_file()
            and sha256_file(out) == manifest.graph(DIT, "int8").sha256):
        _say(progress, "calibrate int8: inputs unchanged; skipped")
        return manifest

    # 1. which layers: the FP8 path's split (embedders and output head stay fp32)
    model = onnx.load(str(art / fp32.file), load_external_data=False)
    quant, high = split_layers(find_layers(model), manifest.model.family)
    if not quant:
        raise CalibrationError("The DiT graph has no linear layers to quantise.", "is this a Qwen-Image DiT export?")
    del model
    _say(progress, f"calibrate int8: {len(quant)} layer(s) to int8 (per-channel weights, dynamic activations), "
                   f"{len(high)} kept fp32")

    # 2. quantise, then check the integer kernels on ONNX Runtime's optimised graph
    with atomic_path(out) as tmp:
        quantize_dynamic(str(art / fp32.file), str(tmp), per_channel=True, weight_type=quant_type.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=excluded(high),
                         extra_options={"MatMulConstBOnly": True},
                         use_external_data_format=fp32.external_data is not None)
        kernels = integer_kernels(tmp)
        if kernels["integer_matmuls"] < len(quant) or kernels["float_weight_matmuls"] != len(high):
            raise CalibrationError(
                f"ONNX Runtime runs {kernels['integer_matmuls']} integer matmul(s) for {len(quant)} quantised layer(s) "
                f"and {kernels['float_weight_matmuls']} float constant matmul(s) for {len(high)} kept layer(s).",
                "this onnxruntime build lacks the integer kernels; upgrade onnxruntime.")
    spec = GraphSpec(DIT, "int8", INT8_FILE, sha256_file(out), fp32.inputs, fp32.outputs)
    _say(progress, f"calibrate int8: integer kernels {kernels['integer_ops']}")

    # 3. accuracy over a whole denoising run (the FP8 report, int8 in place of fp8)
    figures = {}
    if options.eval_steps > 0:
        calset = ds.CalibrationSet(manifest.with_graph(spec), art, ds.DatasetSpec(samples=1, seed=options.seed,
                                                                                  max_pixels=options.max_pixels))
        with OrtBackend(fp32, art) as b32, OrtBackend(spec, art) as b8, \
                OrtBackend(manifest.graph(VAE_DECODER, "fp32"), art) as dec:
            for bucket in calset.buckets:
                _say(progress, f"calibrate int8: {options.eval_steps}-step accuracy run, bucket {int(bucket ** 0.5)}²")
                res = bucket_accuracy(calset, bucket, b32, b8, dec, options.eval_steps, options.seed)
                figures[f"b{int(bucket ** 0.5)}"] = {k: res[k] for k in ("cosine_min", "cosine_mean",
                                                                         "latent_psnr_db", "image_psnr_db", "steps")}
    info = {"quantization": "int8 dynamic", "weights": "int8 per output channel",
            "activations": "dynamic per tensor (one scale per call)", "quantised_layers": len(quant),
            "skipped_layers": sorted({ly.module for ly in high}), "ort_kernels": kernels, "figures": figures}
    seconds = round(time.perf_counter() - start, 2)
    manifest = Manifest.load(art).with_graph(dataclasses.replace(spec, info=info)).with_stage(StageRecord(
        STAGE, inputs_sha, options.settings(), seconds, _versions(), {"figures": figures, "ort_kernels": kernels}))
    manifest.save(art)
    _say(progress, f"calibrate int8: wrote {INT8_FILE} ({out.stat().st_size / 2**20:.2f} MiB) in {seconds:.1f} s")
    return manifest


def _say(progress: Progress | None, msg: str) -> None:
    logger.info(msg)
    if progress is not None:
        progress(msg)


def _versions() -> dict:
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
