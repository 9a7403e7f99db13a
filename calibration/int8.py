"""``calibrate_int8``: the INT8 DiT for CPUs (ONNX Runtime, OpenVINO) and GPUs without FP8 (TensorRT INT8).

Weights are int8, symmetric, per output channel. Activations, both measured:

* ``static``: one int8 scale per tensor from the calibration ranges (absmax over the FP8 path's SELF-packed
  samples, collected per channel), as QuantizeLinear/DequantizeLinear pairs: the explicit-quantisation form
  TensorRT builds INT8 engines from, ``MatMulIntegerToFloat`` on ONNX Runtime, int8 FullyConnected on OpenVINO.
  Where a tensor's channels are lopsided (outliers), SmoothQuant migrates its scale into the weights
  (``calibration/smoothquant.py``); static with and without it are both measured.
* ``dynamic``: weights in blocks of ``block_size`` input channels, activations quantised per token (and block)
  at run time: ``MatMulNBits`` (8 bits, int8 compute) on ONNX Runtime, a weight-compressed FullyConnected with
  dynamic quantisation on OpenVINO. No activation ranges.

Every candidate is checked to run its quantised layers as integer kernels on ONNX Runtime's optimised graph (no
float MatMul reading a constant weight beyond the kept layers) and, when OpenVINO imports, as i8 FullyConnected
nodes there, then measured over a whole denoising run against fp32 (the FP8 path's report). ``onnx/dit.int8.onnx``
(what ``precision="int8"`` loads) is the chosen mode; when that is dynamic, the best static graph is kept too as
the ``qdq`` variant for TensorRT. The layers the FP8 path keeps high precision (embedders, ``norm_out``,
``proj_out``) and any ``keep`` prefixes stay fp32.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from uniref_deploy.export.graph_pass import initializer_map
from uniref_deploy.export.onnx_files import external_data_record, move_graph, save_graph
from uniref_deploy.runtime._lazy import is_available
from uniref_deploy.runtime.artifacts import CALIBRATION_INT8_REPORT
from uniref_deploy.runtime.backends.ort import OrtBackend
from uniref_deploy.runtime.cpu import available_memory_bytes
from uniref_deploy.runtime.errors import CalibrationError, InputError
from uniref_deploy.runtime.fileio import atomic_write_text, sha256_file, sha256_json
from uniref_deploy.runtime.generation import Staging
from uniref_deploy.runtime.graphs import DIT, VAE_DECODER
from uniref_deploy.runtime.locking import writes_artifacts
from uniref_deploy.runtime.manifest import GraphSpec, Manifest, StageRecord
from uniref_deploy.runtime.precision import INT8_QDQ_VARIANT as QDQ_VARIANT

from . import dataset as ds
from .fp8 import FIGURE_KEYS
from .int8_kernels import integer_kernels, openvino_kernels
from .layers import Layer, find_layers, split_layers
from .passes.gemm_matmul import GemmToMatMul
from .passes.int8_activations import QuantizeActivationsInt8
from .passes.int8_weights import QuantizeWeightsInt8
from .passes.opset import UpgradeOpset
from .ranges import collect_channel_absmax
from .report import bucket_accuracies
from .smoothquant import outlier_ratio, plan_smoothing, smoothed_amax

logger = logging.getLogger(__name__)

INT8_FILE = "onnx/dit.int8.onnx"
# peak RSS / fp32 DiT bytes of the stage: 6.04 GB for small's 1.01 GB DiT (--steps 0 --samples 4, three candidates)
MEMORY_FACTOR = 6.0
QDQ_FILE = "onnx/dit.int8.qdq.onnx"
STAGE = "calibrate_int8"
MODES = ("auto", "static", "dynamic")
STATIC, SMOOTH, DYNAMIC = "static", "static+smoothquant", "dynamic"
OUTLIER_RATIO = 8.0  # a tensor is smoothed when its largest channel absmax exceeds 8x the median one
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Int8Options:
    """Args:
        activations (str, default "auto"): "static" (per tensor, calibrated), "dynamic" (per token at run time),
            or "auto": measure both and keep the more accurate as ``dit.int8``.
        smooth (bool | None, default None): SmoothQuant for static activations: None measures static with and
            without it (smoothing the tensors with outliers) and keeps the better; True smooths every tensor;
            False never.
        alpha (float, default 0.5): SmoothQuant migration strength (0: all on activations, 1: all on weights).
        block_size (int, default 128): input channels per weight scale of the dynamic graph (a power of 2 >= 16).
        keep (tuple[str, ...], default ()): more module-name prefixes to keep fp32 (layers a report flagged).
        samples (int, default 8): calibration samples for the activation ranges (the FP8 path's dataset).
        eval_steps (int, default 28): denoising steps of the accuracy report (0: single-step cosine only).
        max_pixels (int, default 512*512): packing budget cap of samples and report (CPU-sized sequences).
        seed (int, default 0): seed of the samples and of the report's noise and prompt.
        force (bool, default False): re-quantise even when the inputs are unchanged.
    """

    activations: str = "auto"
    smooth: bool | None = None
    alpha: float = 0.5
    block_size: int = 128
    keep: tuple[str, ...] = ()
    samples: int = 8
    eval_steps: int = 28
    max_pixels: int = 512 * 512
    seed: int = 0
    force: bool = False

    def __post_init__(self) -> None:
        if self.activations not in MODES:
            raise InputError(f"INT8 activations '{self.activations}' is not a mode.", f"use one of {', '.join(MODES)}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"SmoothQuant alpha must be in 0..1, got {self.alpha}.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InputError(f"block_size must be a power of 2 of at least 16, got {self.block_size}.")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise InputError(f"samples must be at least 1, got {self.samples!r}.")
        if not isinstance(self.eval_steps, int) or self.eval_steps < 0:
            raise InputError(f"eval_steps must be 0 or more, got {self.eval_steps!r}.")

    def settings(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "force"}
        d["keep"] = list(self.keep)
        return d


@dataclass
class Candidate:
    """One quantised graph under test: its mode, file (in the staging folder) and measured figures."""

    name: str
    path: Path
    info: dict
    kernels: dict
    figures: dict = dataclasses.field(default_factory=dict)

    @property
    def static(self) -> bool:
        return self.name != DYNAMIC

    def score(self) -> float:
        """Mean latent PSNR over the buckets (else the single-step cosine): higher is better."""
        if "single_step_cosine_mean" in self.figures:
            return float(self.figures["single_step_cosine_mean"])
        return float(np.mean([f["latent_psnr_db"] for f in self.figures.values()]))


# ---- checks -------------------------------------------------------------------------------------------------------


def check_kernels(cand: Candidate, quantised: int, kept: int) -> None:
    """Raise unless ONNX Runtime (and OpenVINO when present) run every quantised layer as an integer kernel.

    Raises:
        CalibrationError: a quantised layer runs as a float matmul.
    """
    k = cand.kernels["ort"]
    if k["integer_matmuls"] < quantised or k["float_weight_matmuls"] != kept:
        raise CalibrationError(
            f"{cand.name}: ONNX Runtime runs {k['integer_matmuls']} integer matmul(s) for {quantised} quantised "
            f"layer(s) and {k['float_weight_matmuls']} float constant matmul(s) for {kept} kept layer(s).",
            "this onnxruntime build lacks the integer kernels; upgrade onnxruntime.")
    ov = cand.kernels.get("openvino")
    if ov is not None and ov["int8"] < quantised:
        raise CalibrationError(f"{cand.name}: OpenVINO runs {ov['int8']} int8 FullyConnected node(s) for {quantised} "
                               "quantised layer(s).", "upgrade openvino.")


# ---- the stage ----------------------------------------------------------------------------------------------------


@writes_artifacts("calibrate")
def calibrate_int8(art_dir, options: Int8Options, progress: Progress | None = None) -> Manifest:
    """Quantise the fp32 DiT of ``art_dir`` to INT8 (both activation modes measured) and record it.

    Raises:
        ManifestError: the artifacts lack the fp32 DiT or it was damaged.
        CalibrationError: a candidate left float matmuls in quantised layers, or a graph fails to load.
    """
    start = time.perf_counter()
    art = Path(art_dir)
    manifest = Manifest.load(art)
    fp32 = manifest.graph(DIT, "fp32")
    manifest.verify_files(art, (fp32.key,))
    check_memory(art, fp32)
    spec = ds.DatasetSpec(samples=options.samples, seed=options.seed, max_pixels=options.max_pixels)
    inputs_sha = sha256_json({"dit": fp32.sha256, "options": options.settings(), "scheme": "int8-v2",
                              "dataset": ds.fingerprint(spec, manifest)})
    if not options.force and _up_to_date(art, manifest, inputs_sha):
        _say(progress, "calibrate int8: inputs unchanged; skipped")
        return manifest

    # 1. layers: the FP8 path's split plus the caller's keep list
    model = onnx.load(str(art / fp32.file))
    quant, high = split_layers(find_layers(model), manifest.model.family)
    if options.keep:
        kept = [ly for ly in quant if any(ly.module == k or ly.module.startswith(k + ".") for k in options.keep)]
        quant, high = [ly for ly in quant if ly not in kept], high + kept
    if not quant:
        raise CalibrationError("The DiT graph has no linear layers to quantise.", "is this a Qwen-Image DiT export?")
    _say(progress, f"calibrate int8: {len(quant)} layer(s) to int8, {len(high)} kept fp32")

    # 2. activation ranges per channel on the FP8 path's SELF-packed samples (static modes only)
    modes = _modes(options)
    calset = ds.CalibrationSet(manifest, art, spec)
    channel_amax: dict[str, np.ndarray] = {}
    samples = []
    if any(m != DYNAMIC for m in modes):
        samples = list(calset)
        _say(progress, f"calibrate int8: collecting per-channel ranges of {len({ly.activation for ly in quant})} "
                       f"tensor(s) on {len(samples)} sample(s)")
        channel_amax = collect_channel_absmax(model, [ly.activation for ly in quant], (s.feeds for s in samples))

    # 3. candidates, each written to the staging folder and checked for integer kernels
    staging = Staging(art, "calibrate")
    try:
        candidates = []
        for mode in modes:
            cand = build_candidate(model, mode, quant, channel_amax, options, staging.root / "candidates")
            if cand is None:
                _say(progress, f"calibrate int8: {mode}: no tensor has outliers; same graph as static, skipped")
                continue
            check_kernels(cand, len(quant), len(high))
            _say(progress, f"calibrate int8: {mode}: ORT {cand.kernels['ort']['integer_ops']}"
                           + (f", OpenVINO FC {cand.kernels['openvino']['fully_connected']}"
                              if cand.kernels.get("openvino") else ""))
            candidates.append(cand)
        del model

        # 4. accuracy of every candidate against one fp32 run per bucket
        measure(candidates, manifest, art, fp32, calset, samples, options, progress)
        chosen, qdq = choose(candidates, options)
        _say(progress, f"calibrate int8: chose {chosen.name} for dit.int8"
                       + (f", {qdq.name} kept as the TensorRT Q/DQ graph" if qdq is not None else ""))

        # 5. record: the chosen graph (+ the static Q/DQ one), the report, the manifest
        report = _report(candidates, chosen, qdq, options, quant, high, channel_amax)
        (staging.root / INT8_FILE).parent.mkdir(parents=True, exist_ok=True)
        move_graph(chosen.path, staging.root / INT8_FILE)
        new = manifest.without_graph(f"{DIT}.int8.{QDQ_VARIANT}")
        new = new.with_graph(_spec(fp32, INT8_FILE, staging.root, _info(chosen, report, candidates)))
        if qdq is not None:
            move_graph(qdq.path, staging.root / QDQ_FILE)
            new = new.with_graph(_spec(fp32, QDQ_FILE, staging.root, _info(qdq, report, candidates), QDQ_VARIANT))
        shutil.rmtree(staging.root / "candidates", ignore_errors=True)
        atomic_write_text(staging.root / CALIBRATION_INT8_REPORT, json.dumps(report, indent=2) + "\n")
        seconds = round(time.perf_counter() - start, 2)
        new = new.with_stage(StageRecord(STAGE, inputs_sha, options.settings(), seconds, _versions(),
                                         {"chosen": chosen.name, "qdq": qdq.name if qdq else None,
                                          "figures": {c.name: c.figures for c in candidates},
                                          "report": CALIBRATION_INT8_REPORT}))
        manifest = staging.commit(new)
    except BaseException:
        staging.discard()
        raise
    _say(progress, f"calibrate int8: wrote {INT8_FILE} ({chosen.name}) in {seconds:.1f} s")
    return manifest


def check_memory(art: Path, fp32: GraphSpec, available: int | None = None) -> None:
    """Refuse, before loading anything, a DiT whose calibration would not fit in the free memory.

    The stage holds the fp32 graph, a quantised copy being built and ONNX Runtime / OpenVINO sessions of them:
    its peak is about ``MEMORY_FACTOR`` times the fp32 weights (measured on ``small``).
    """
    weights = sum((art / rel).stat().st_size for rel, _ in fp32.files)
    need = MEMORY_FACTOR * weights
    available = available_memory_bytes() if available is None else available
    if available is not None and need > available:
        raise CalibrationError(
            f"INT8 calibration of this {weights / 2**30:.1f} GiB fp32 DiT needs about {need / 2**30:.1f} GiB of "
            f"memory, but {available / 2**30:.1f} GiB is available.",
            "run `calibrate --precision int8` on a machine with more free memory (the INT8 graph then serves "
            "anywhere).")


def _modes(options: Int8Options) -> list[str]:
    static = {None: [STATIC, SMOOTH], True: [SMOOTH], False: [STATIC]}[options.smooth]
    return {"auto": static + [DYNAMIC], "static": static, "dynamic": [DYNAMIC]}[options.activations]


def build_candidate(model: onnx.ModelProto, mode: str, quant: list[Layer], channel_amax: dict[str, np.ndarray],
                    options: Int8Options, folder: Path) -> Candidate | None:
    """Quantise a copy of ``model`` in ``mode``, save it under ``folder`` and count its kernels (None: a
    SmoothQuant candidate with nothing to smooth)."""
    smooth: dict[str, np.ndarray] = {}
    if mode == SMOOTH:
        weights = _layer_weights(model, quant)
        ratio = OUTLIER_RATIO if options.smooth is None else 0.0
        smooth = plan_smoothing(channel_amax, weights, options.alpha, ratio)
        if not smooth:
            return None
    cand = onnx.ModelProto()
    cand.CopyFrom(model)
    nodes = [ly.node for ly in quant]
    counts = {"gemm_to_matmul": GemmToMatMul(nodes)(cand), "opset": UpgradeOpset(21 if mode == DYNAMIC else 19)(cand)}
    # GemmToMatMul moved some layers' input behind an Unsqueeze: key ranges and factors by each node's input now
    current = {n.name: n.input[0] for n in cand.graph.node if n.name in set(nodes)}
    renamed = [(ly.activation, current.get(ly.node, ly.activation)) for ly in quant]
    smooth = {new: smooth[old] for old, new in renamed if old in smooth}
    block = options.block_size if mode == DYNAMIC else None
    counts["int8_weights"] = QuantizeWeightsInt8(nodes, block, smooth)(cand)
    info: dict = {"activation_mode": "dynamic" if mode == DYNAMIC else "static", "candidate": mode}
    if mode == DYNAMIC:
        info.update(weights=f"int8 per output channel, blocks of {block} input channels",
                    activations="dynamic per token (and block), quantised at run time")
    else:
        amax = smoothed_amax({new: channel_amax[old] for old, new in renamed}, smooth)
        counts["int8_activations"] = QuantizeActivationsInt8([(n, 0) for n in nodes], amax, smooth)(cand)
        info.update(weights="int8 per output channel", activations="static per tensor (calibrated absmax / 127)")
        if smooth:
            info["smoothquant"] = {"alpha": options.alpha, "tensors": len(smooth),
                                   "rule": f"outlier ratio > {OUTLIER_RATIO:g}" if options.smooth is None else "all"}
    info["passes"] = counts
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"dit.{mode.replace('+', '_')}.onnx"
    save_graph(cand, path)  # weights in <path>.data when the graph nears the protobuf limit
    del cand
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise CalibrationError(f"The INT8 graph ({mode}) fails the ONNX checker: {err}".splitlines()[0]) from err
    kernels = {"ort": integer_kernels(path), "openvino": openvino_kernels(path)}
    return Candidate(mode, path, info, kernels)


def _layer_weights(model: onnx.ModelProto, quant: list[Layer]) -> dict[str, list[np.ndarray]]:
    """Activation tensor -> the ``[in, out]`` weights of the quantised layers reading it."""
    inits = initializer_map(model.graph)
    by_node = {n.name: n for n in model.graph.node}
    out: dict[str, list[np.ndarray]] = {}
    for ly in quant:
        w = numpy_helper.to_array(inits[ly.weight])
        node = by_node[ly.node]
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            w = w.T
        out.setdefault(ly.activation, []).append(w)
    return out


def measure(candidates: list[Candidate], manifest: Manifest, art: Path, fp32: GraphSpec, calset: ds.CalibrationSet,
            samples: list, options: Int8Options, progress: Progress | None) -> None:
    """Fill each candidate's figures: per-bucket 28-step runs (or one-step cosine when ``eval_steps`` is 0)."""
    specs = {c.name: GraphSpec(DIT, "int8", str(c.path), "", fp32.inputs, fp32.outputs) for c in candidates}
    if options.eval_steps <= 0:
        from uniref_deploy.runtime.compare import compare

        probe = (samples or list(calset))[:3]
        with OrtBackend(fp32, art) as b32:
            expected = [b32.infer(s.feeds)["velocity"] for s in probe]
        for c in candidates:
            with OrtBackend(specs[c.name], "/", verify=False) as b8:
                cos = [compare("velocity", b8.infer(s.feeds)["velocity"], e).cosine for s, e in zip(probe, expected, strict=True)]
            c.figures = {"single_step_cosine_mean": round(float(np.mean(cos)), 6), "single_step_cosine_min": round(min(cos), 6)}
        return
    with OrtBackend(fp32, art) as b32, OrtBackend(manifest.graph(VAE_DECODER, "fp32"), art) as dec:
        for bucket in calset.buckets:
            _say(progress, f"calibrate int8: {options.eval_steps}-step accuracy runs, bucket {bucket}")
            backends = {c.name: OrtBackend(specs[c.name], "/", verify=False) for c in candidates}
            res = bucket_accuracies(calset, bucket, b32, backends, dec, options.eval_steps, options.seed)
            for c in candidates:
                c.figures[f"b{bucket.name}"] = res[c.name]
                _say(progress, f"calibrate int8:   {c.name}: latent PSNR {res[c.name]['latent_psnr_db']} dB, "
                               f"velocity cosine min {res[c.name]['cosine_min']}")


def choose(candidates: list[Candidate], options: Int8Options) -> tuple[Candidate, Candidate | None]:
    """(the graph for ``dit.int8``, the static Q/DQ graph to keep beside it for TensorRT or None).

    The best static candidate is the more accurate of static with and without SmoothQuant; in ``auto`` mode the
    CPU graph is the more accurate of it and the dynamic one (ties go to static: one graph serves every backend).
    """
    static = [c for c in candidates if c.static]
    best_static = max(static, key=Candidate.score) if static else None
    dynamic = next((c for c in candidates if not c.static), None)
    if best_static is None:
        return dynamic, None  # type: ignore[return-value]  # a mode always yields a candidate
    if dynamic is None or best_static.score() >= dynamic.score():
        return best_static, None
    return dynamic, best_static


def _spec(fp32: GraphSpec, file: str, root: Path, info: dict, variant: str = "") -> GraphSpec:
    external, pins = external_data_record(root, file)
    return GraphSpec(DIT, "int8", file, sha256_file(root / file), fp32.inputs, fp32.outputs, info={**info, **pins},
                     variant=variant, external_data=external)


def _info(cand: Candidate, report: dict, candidates: list[Candidate]) -> dict:
    return {**cand.info, "quantization": "int8", "quantised_layers": report["quantised_layers"],
            "skipped_layers": report["skipped_layers"], "ort_kernels": cand.kernels["ort"],
            "openvino_kernels": cand.kernels.get("openvino"),
            "figures": {k: {f: v[f] for f in FIGURE_KEYS if f in v} if isinstance(v, dict) else v
                        for k, v in cand.figures.items()},
            "measured": {c.name: _summary(c) for c in candidates}, "report": CALIBRATION_INT8_REPORT}


def _summary(c: Candidate) -> dict:
    if "single_step_cosine_mean" in c.figures:
        return dict(c.figures)
    return {b: {"latent_psnr_db": f["latent_psnr_db"], "cosine_min": f["cosine_min"], "cosine_mean": f["cosine_mean"]}
            for b, f in c.figures.items()}


def _report(candidates: list[Candidate], chosen: Candidate, qdq: Candidate | None, options: Int8Options,
            quant: list[Layer], high: list[Layer], channel_amax: dict[str, np.ndarray]) -> dict:
    ratios = sorted(((outlier_ratio(a), t) for t, a in channel_amax.items()), reverse=True)
    return {
        "settings": options.settings(),
        "chosen": chosen.name,
        "qdq_for_tensorrt": qdq.name if qdq is not None else (chosen.name if chosen.static else None),
        "quantised_layers": len(quant),
        "skipped_layers": sorted({ly.module for ly in high}),
        "activation_outliers": {"ratio_threshold": OUTLIER_RATIO, "tensors": len(ratios),
                                "above_threshold": sum(r > OUTLIER_RATIO for r, _ in ratios),
                                "largest": [{"tensor": t, "ratio": round(r, 2)} for r, t in ratios[:5]]},
        "candidates": {c.name: {"info": c.info, "kernels": c.kernels, "figures": c.figures} for c in candidates},
    }


def _up_to_date(art: Path, manifest: Manifest, inputs_sha: str) -> bool:
    record = manifest.stage(STAGE)
    return (record is not None and record.inputs_sha256 == inputs_sha and manifest.has_graph(DIT, "int8")
            and (art / INT8_FILE).is_file() and sha256_file(art / INT8_FILE) == manifest.graph(DIT, "int8").sha256)


def _say(progress: Progress | None, msg: str) -> None:
    logger.info(msg)
    if progress is not None:
        progress(msg)


def _versions() -> dict:
    import onnxruntime

    versions = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if is_available("openvino"):
        import openvino

        versions["openvino"] = openvino.__version__
    return versions
