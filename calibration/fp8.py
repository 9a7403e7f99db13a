"""``calibrate_fp8``: the calibration stage. fp16 DiT graph (else fp32) + SELF-packed samples -> ``onnx/dit.fp8.onnx``.

Road: ONNX-level Q/DQ. Activation absmax of every quantised linear layer is collected in ONNX Runtime on the
source graph (the fp16 DiT when exported, else fp32); the graph passes under ``calibration/passes`` then store
those layers' weights as float8 E4M3 behind DequantizeLinear (per output channel or per tensor) and fake-quantise
their inputs with QuantizeLinear/DequantizeLinear (scale = absmax / E4M3_MAX, float8e4m3fn zero point). The
embedders and the output head stay high-precision, and the fp16 graph's fp32 islands stay fp32; scales take the
type of the tensor they scale, so a strongly-typed TensorRT build runs fp16 everywhere else and turns the Q/DQ
pairs into FP8 GEMMs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from uniref_deploy.runtime.artifacts import CALIBRATION_RANGES, CALIBRATION_REPORT
from uniref_deploy.runtime.backends.ort import OrtBackend
from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.compare import compare
from uniref_deploy.runtime.errors import CalibrationError, InputError
from uniref_deploy.runtime.fileio import atomic_path, atomic_write_text, sha256_file, sha256_json
from uniref_deploy.runtime.generation import Staging
from uniref_deploy.runtime.graphs import DIT, VAE_DECODER
from uniref_deploy.runtime.locking import writes_artifacts
from uniref_deploy.runtime.manifest import GraphSpec, Manifest, StageRecord
from uniref_deploy.runtime.packing import MIN_REFERENCE_SIDE
from uniref_deploy.runtime.precision import E4M3_MAX

from . import dataset as ds
from .layers import Layer, attention_targets, find_layers, split_layers
from .passes import PassOptions, fp8_passes
from .ranges import collect_absmax, session, tensor_types
from .report import bucket_accuracy, write_report

logger = logging.getLogger(__name__)

FP8_FILE = "onnx/dit.fp8.onnx"
MIN_PIXELS = MIN_REFERENCE_SIDE * MIN_REFERENCE_SIDE  # a calibration sample holds at least one reference
FIGURE_KEYS = ("cosine_min", "cosine_mean", "latent_psnr_db", "image_psnr_db", "steps")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class CalibrationOptions:
    """Args:
        samples (int, default 8): calibration samples, spread round-robin over the buckets.
        images (str | None, default None): folder of reference images; None: built-in procedural set.
        fp8_attention (bool, default False): also FP8 the attention q·kᵀ and p·v matmuls.
        per_channel (bool | None, default None): per-output-channel weight scales (True), per-tensor (False), or
            None: try both on the calibration set and keep the more accurate.
        seed (int, default 0): seed of every random draw (samples, evaluation noise).
        max_pixels (int, default 512*512): packing budget cap per calibration sample (CPU-sized sequences).
        eval_steps (int, default 28): denoising steps of the accuracy report (0 skips the report).
        force (bool, default False): recalibrate even when the inputs are unchanged.
    """

    samples: int = 8
    images: str | None = None
    fp8_attention: bool = False
    per_channel: bool | None = None
    seed: int = 0
    max_pixels: int = 512 * 512
    eval_steps: int = 28
    force: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.samples, int) or self.samples < 1:
            raise InputError(f"samples must be at least 1, got {self.samples!r}.")
        if not isinstance(self.eval_steps, int) or self.eval_steps < 0:
            raise InputError(f"eval_steps must be 0 or more, got {self.eval_steps!r}.")
        if not isinstance(self.max_pixels, int) or self.max_pixels < MIN_PIXELS:
            raise InputError(f"max_pixels {self.max_pixels!r} is below {MIN_PIXELS} ({MIN_REFERENCE_SIDE}x"
                             f"{MIN_REFERENCE_SIDE}), the smallest budget a reference fits.",
                             f"use --max-side {MIN_REFERENCE_SIDE} or more.")

    def settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "force"}


def _say(progress: Progress | None, msg: str) -> None:
    logger.info(msg)
    if progress is not None:
        progress(msg)


@writes_artifacts("calibrate")
def calibrate_fp8(art_dir, options: CalibrationOptions, progress: Progress | None = None) -> Manifest:
    """Calibrate the fp32 DiT of ``art_dir`` to FP8 and record it in the manifest.

    Steps: check the inputs (skip when unchanged), draw the calibration set, pick the layers and collect their
    activation ranges, quantise (per-channel and per-tensor weights measured when not chosen), write and check
    the graph, run the accuracy report, record everything.

    Args:
        art_dir (str | PathLike): artifact folder with an fp32 ``dit`` and ``vae_encoder``/``vae_decoder`` graph.
        options (CalibrationOptions): see the dataclass.
        progress (Callable[[str], None] | None): receives one line per step.

    Returns:
        Manifest: the saved manifest with the ``dit``/``fp8`` graph and the ``calibrate`` stage record.

    Raises:
        ManifestError: the artifacts lack a graph or a file was damaged.
        CalibrationError: bad options, empty data, or a produced graph that fails the checker/ORT.
    """
    start = time.perf_counter()
    art = Path(art_dir)
    manifest = Manifest.load(art)
    fp32 = manifest.graph(DIT, "fp32")
    # the Q/DQ graph derives from the fp16 DiT when exported (fp16 around the FP8 GEMMs, its fp32 islands kept)
    source = manifest.graph(DIT, "fp16") if manifest.has_graph(DIT, "fp16") else fp32
    manifest.verify_files(art, tuple(dict.fromkeys((fp32.key, source.key))))
    spec = ds.DatasetSpec(samples=options.samples, images=options.images, seed=options.seed,
                          max_pixels=options.max_pixels)
    inputs_sha = sha256_json({"dit": fp32.sha256, "source": source.sha256, "options": options.settings(),
                              "dataset": ds.fingerprint(spec, manifest)})
    if not options.force and _up_to_date(art, manifest, inputs_sha):
        _say(progress, "calibrate: inputs unchanged; skipped")
        return manifest

    # 1. calibration set
    _say(progress, f"calibrate: drawing {spec.samples} sample(s) over {len(manifest.budgets) or 1} bucket(s)")
    calset = ds.CalibrationSet(manifest, art, spec)
    samples = list(calset)
    model = onnx.load(str(art / source.file))

    # 2. layers and ranges
    layers = select_layers(model, manifest.model.family, options.fp8_attention)
    _say(progress, f"calibrate: collecting ranges of {len(set(layers.tensors(model)))} tensor(s) on "
                   f"{len(samples)} sample(s)")
    ranges = collect_absmax(model, layers.tensors(model), (s.feeds for s in samples))

    # 3. quantise (per-channel vs per-tensor measured when not chosen)
    choice = choose_weight_scales(model, layers, ranges, samples, options, progress)

    # 4. write and check (beside the live artifact: the manifest switches to it last)
    staging = Staging(art, "calibrate")
    spec8 = write_graph(staging.root, choice.model, source)

    # 5. accuracy report
    buckets_report = accuracy_runs(art, staging.root, manifest.with_graph(spec8), fp32, spec8, calset, spec, options,
                                   progress)

    # 6. record
    sizes = _sizes(art, fp32, staging.root / FP8_FILE, _fp16_path(art, manifest), layers.quantised)
    report = {
        "settings": {**options.settings(), "scales": choice.label},
        "alternatives": choice.tried,
        "quantised_layers": len(layers.quantised),
        "skipped_layers": sorted({ly.module for ly in layers.high_precision}),
        "sizes": sizes,
        "buckets": buckets_report,
    }
    report_json, report_png = write_report(art, report)
    scales = {ly.module: round(ranges[ly.activation] / E4M3_MAX, 8) for ly in layers.quantised}
    atomic_write_text(art / CALIBRATION_RANGES, json.dumps({"activation_scales": scales}, indent=2) + "\n")
    figures = {f"b{Budget.from_pixels(b['bucket']).name}": {k: b[k] for k in FIGURE_KEYS} for b in buckets_report}
    info = {**_graph_info(choice, options, layers, report, scales, figures, sizes), "source": source.precision}
    spec8 = dataclasses.replace(spec8, info=info)
    seconds = round(time.perf_counter() - start, 2)
    manifest = manifest.with_graph(spec8).with_stage(StageRecord(
        "calibrate", inputs_sha, {**options.settings(), "dataset": ds.fingerprint(spec, manifest),
                                  "dataset_feeds_sha256": ds.feeds_digest(samples)}, seconds,
        _versions(), {"figures": figures, "alternatives": choice.tried,
                      "report": str((report_png or report_json).relative_to(art))}))
    manifest = staging.commit(manifest)
    _say(progress, f"calibrate: wrote {FP8_FILE} ({sizes['fp8_file_bytes'] / 2**20:.2f} MiB) in {seconds:.1f} s")
    return manifest


# ---- the steps ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSelection:
    """The linear layers to quantise, those kept high-precision, and the attention matmul inputs (optional)."""

    quantised: list[Layer]
    high_precision: list[Layer]
    attention: list[tuple[str, int]]

    @property
    def activation_targets(self) -> list[tuple[str, int]]:
        return [(ly.node, 0) for ly in self.quantised]

    def tensors(self, model: onnx.ModelProto) -> list[str]:
        """Every tensor whose range is needed: the quantised layers' inputs, then the attention inputs."""
        by_name = {n.name: n for n in model.graph.node}
        return [ly.activation for ly in self.quantised] + [by_name[n].input[i] for n, i in self.attention]


@dataclass(frozen=True)
class WeightScaleChoice:
    """The quantised graph kept, whether its weight scales are per channel, and every candidate's figures."""

    model: onnx.ModelProto
    per_channel: bool
    tried: dict[str, dict]

    @property
    def label(self) -> str:
        return _scale_label(self.per_channel)


def _up_to_date(art: Path, manifest: Manifest, inputs_sha: str) -> bool:
    """The recorded calibration used the same inputs and its graph file is intact."""
    record = manifest.stage("calibrate")
    return (record is not None and record.inputs_sha256 == inputs_sha and manifest.has_graph(DIT, "fp8")
            and (art / FP8_FILE).is_file() and sha256_file(art / FP8_FILE) == manifest.graph(DIT, "fp8").sha256)


def select_layers(model: onnx.ModelProto, family: str, fp8_attention: bool) -> LayerSelection:
    """Split the graph's linear layers by the family's high-precision list; find the attention matmuls.

    Raises:
        CalibrationError: the graph has no linear layer to quantise.
    """
    quant, high = split_layers(find_layers(model), family)
    if not quant:
        raise CalibrationError("The DiT graph has no linear layers to quantise.", "is this a Qwen-Image DiT export?")
    return LayerSelection(quant, high, attention_targets(model) if fp8_attention else [])


def choose_weight_scales(model: onnx.ModelProto, layers: LayerSelection, ranges: dict[str, float],
                         samples: list[ds.CalibrationSample], options: CalibrationOptions,
                         progress: Progress | None = None) -> WeightScaleChoice:
    """Quantise ``model`` with per-channel and/or per-tensor weight scales; keep the one whose single-step
    velocity is closest (mean cosine over up to 3 samples) to the fp32 graph's."""
    reference = session(model)
    probe = samples[: min(3, len(samples))]
    expected = [reference.run(["velocity"], s.feeds)[0] for s in probe]
    candidates = [True, False] if options.per_channel is None else [options.per_channel]
    tried: dict[str, dict] = {}
    best: tuple[float, bool, onnx.ModelProto] | None = None
    for per_channel in candidates:
        pass_opts = PassOptions(per_channel=per_channel, fp8_attention=options.fp8_attention)
        candidate = onnx.ModelProto()
        candidate.CopyFrom(model)
        counts = {p.name: p(candidate) for p in fp8_passes(pass_opts, [ly.node for ly in layers.quantised],
                                                           layers.activation_targets, layers.attention, ranges,
                                                           tensor_dtypes(model, layers.tensors(model)))}
        sess = session(candidate)
        cos = [compare("velocity", sess.run(["velocity"], s.feeds)[0], e).cosine
               for s, e in zip(probe, expected, strict=True)]
        label = _scale_label(per_channel)
        tried[label] = {"cosine_min": round(min(cos), 6), "cosine_mean": round(float(np.mean(cos)), 6), "passes": counts}
        _say(progress, f"calibrate: {label} weights: single-step cosine min {min(cos):.5f} mean {np.mean(cos):.5f}")
        if best is None or np.mean(cos) > best[0]:
            best = (float(np.mean(cos)), per_channel, candidate)
    assert best is not None  # at least one candidate always runs
    return WeightScaleChoice(best[2], best[1], tried)


def tensor_dtypes(model: onnx.ModelProto, tensors: list[str]) -> dict[str, np.dtype]:
    """The numpy dtype of each of ``tensors`` in ``model`` (scales take the type of the tensor they scale)."""
    types = tensor_types(model)
    return {t: onnx.helper.tensor_dtype_to_np_dtype(types[t]) for t in tensors if t in types}


def write_graph(art: Path, fp8_model: onnx.ModelProto, source: GraphSpec) -> GraphSpec:
    """Save ``onnx/dit.fp8.onnx`` atomically after the ONNX checker passed; its spec (no info yet).

    Raises:
        CalibrationError: the graph fails the checker.
    """
    out = art / FP8_FILE
    with atomic_path(out) as tmp:
        onnx.save(fp8_model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as err:
            raise CalibrationError(f"The FP8 graph fails the ONNX checker: {err}".splitlines()[0]) from err
    return GraphSpec(DIT, "fp8", FP8_FILE, sha256_file(out), source.inputs, source.outputs)


def accuracy_runs(art: Path, fp8_root: Path, staged: Manifest, fp32: GraphSpec, fp8: GraphSpec, calset: ds.CalibrationSet,
                  spec: ds.DatasetSpec, options: CalibrationOptions, progress: Progress | None = None) -> list[dict]:
    """One ``eval_steps``-step edit per bucket at both precisions (none when ``eval_steps`` is 0); the FP8 graph
    is read from ``fp8_root`` (the staging folder), everything else from ``art``."""
    if options.eval_steps <= 0:
        return []
    out = []
    with OrtBackend(fp32, art) as b32, OrtBackend(fp8, fp8_root) as b8, \
            OrtBackend(staged.graph(VAE_DECODER, "fp32"), art) as dec:
        for bucket in calset.buckets:
            _say(progress, f"calibrate: {options.eval_steps}-step accuracy run, bucket {bucket}")
            out.append(bucket_accuracy(ds.CalibrationSet(staged, art, spec), bucket, b32, b8, dec,
                                       options.eval_steps, options.seed))
    return out


def _graph_info(choice: WeightScaleChoice, options: CalibrationOptions, layers: LayerSelection, report: dict,
                scales: dict[str, float], figures: dict, sizes: dict) -> dict:
    scale_values = np.asarray(list(scales.values()), np.float64)
    return {
        "opset": max(o.version for o in choice.model.opset_import if o.domain in ("", "ai.onnx")),
        "quantization": "fp8-e4m3 q/dq",
        "weight_scales": choice.label,
        "fp8_attention": options.fp8_attention,
        "quantised_layers": len(layers.quantised),
        "skipped_layers": report["skipped_layers"],
        "activation_scales": {"count": len(scales), "min": float(scale_values.min()),
                              "median": float(np.median(scale_values)), "max": float(scale_values.max())},
        "figures": figures,
        "sizes": sizes,
        "ranges": CALIBRATION_RANGES,
        "report": CALIBRATION_REPORT,
    }


def _scale_label(per_channel: bool) -> str:
    return "per-channel" if per_channel else "per-tensor"


def _fp16_path(art: Path, manifest: Manifest) -> Path | None:
    return art / manifest.graph(DIT, "fp16").file if manifest.has_graph(DIT, "fp16") else None


def weight_bytes(path: str | Path) -> int:
    """Bytes of all initializers of an ONNX file (external data included)."""
    model = onnx.load(str(path))
    return int(sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer))


def _sizes(art: Path, fp32: GraphSpec, fp8_path: Path, fp16_path: Path | None, quant) -> dict:
    """File and weight sizes; ``quantised_*`` counts only the FP8 layers' weights (+ their scales)."""
    fp8_model = onnx.load(str(fp8_path))
    fp8_q = sum(onnx.numpy_helper.to_array(t).nbytes for t in fp8_model.graph.initializer
                if t.data_type == onnx.TensorProto.FLOAT8E4M3FN or t.name.endswith("_scale"))
    params = sum(ly.params for ly in quant)
    out = {
        "fp32_file_bytes": (art / fp32.file).stat().st_size,
        "fp8_file_bytes": fp8_path.stat().st_size,
        "fp8_weight_bytes": weight_bytes(fp8_path),
        "quantised_params": params,
        "quantised_fp8_bytes": int(fp8_q),
        "quantised_fp16_bytes": 2 * params,
        "quantised_fp8_over_fp16": round(fp8_q / (2 * params), 4),
    }
    if fp16_path is not None:
        out["fp16_file_bytes"] = fp16_path.stat().st_size
        out["fp16_weight_bytes"] = weight_bytes(fp16_path)
        out["fp8_over_fp16_weights"] = round(out["fp8_weight_bytes"] / out["fp16_weight_bytes"], 4)
        out["fp8_over_fp16_file"] = round(out["fp8_file_bytes"] / out["fp16_file_bytes"], 4)
    return out


def _versions() -> dict:
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
