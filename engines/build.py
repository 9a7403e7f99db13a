"""Build the TensorRT engines of a ``BuildPlan`` and record their provenance.

Each engine is built by a few direct TensorRT calls (the same steps as polygraphy's ``NetworkFromOnnxPath`` ->
``CreateConfig`` -> ``EngineBytesFromNetwork`` -> ``SaveBytes``, which ``build --dry-run`` prints as ``polygraphy
convert``): parse the ONNX into a strongly typed network, one optimization profile per bucket, optimization
level, shared timing cache, refit / weight-streaming flags, then ``build_serialized_network``. The serialised
bytes go straight to a temporary sibling of ``ART/engines/<graph>.<precision>.plan`` (hashed while written,
never deserialised here) that is renamed over it. The manifest gets one ``EngineSpec`` per engine (its bucket
per profile; TensorRT version, GPU and compute capability, ONNX sha256, plan-settings hash, build seconds,
bytes) and a ``build`` stage record; it is saved after every engine, so an interrupted build resumes where it
stopped. An engine whose settings hash (ONNX sha256 included) and build environment are unchanged and whose file
is intact is reused. Each ONNX file is hashed once per build. tensorrt and cuda-python are imported only when
building.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from uniref_deploy.runtime._lazy import is_available, require
from uniref_deploy.runtime.errors import EngineBuildError, ManifestError, MissingDependencyError, UnirefError
from uniref_deploy.runtime.fileio import atomic_path, atomic_write_bytes, sha256_file, sha256_json
from uniref_deploy.runtime.locking import writes_artifacts
from uniref_deploy.runtime.manifest import EngineSpec, Manifest, StageRecord

from .plan import save_plan
from .records import BuildPlan, EnginePlan

logger = logging.getLogger(__name__)

STAGE = "build"


@dataclass(frozen=True)
class BuildOptions:
    """How to run a plan.

    Args:
        force (bool, default False): rebuild engines even when an up-to-date plan file exists.
        verify_onnx (bool, default True): check each ONNX file against the manifest's sha256 first.
        device (int, default 0): CUDA device to build on (and to record in the provenance).
    """

    force: bool = False
    verify_onnx: bool = True
    device: int = 0


@dataclass(frozen=True)
class BuildEnvironment:
    """What an engine is tied to: the TensorRT version and the GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


# ---------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------


def check_build_environment() -> str | None:
    """Why engines cannot be built here, in one line, or None when TensorRT and a GPU are both present.

    The GPU is looked up through cuda-python, or ``nvidia-smi`` when cuda-python is absent (torch is never
    imported).
    """
    if not is_available("tensorrt"):
        return ("TensorRT is not installed (the Python package 'tensorrt' cannot be imported); building engines "
                "needs an NVIDIA GPU with TensorRT: pip install 'uniref-deploy[gpu]' (CUDA 12) or '[gpu-cu13]'")
    return _gpu_problem()


def _gpu_problem() -> str | None:
    from uniref_deploy.runtime.cuda import error_name, load_cudart

    try:
        cudart = load_cudart()
    except MissingDependencyError:
        if shutil.which("nvidia-smi") is None:
            return "no NVIDIA GPU is visible (cuda-python is not installed and nvidia-smi is not on PATH)"
        listing = _nvidia_smi(["-L"])
        return None if listing and "GPU" in listing else "no NVIDIA GPU is visible (`nvidia-smi -L` lists none)"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        return f"no usable NVIDIA GPU is visible (CUDA reports {error_name(err)})"
    return None if count > 0 else "no NVIDIA GPU is visible (CUDA reports 0 devices)"


def _nvidia_smi(args: list[str]) -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def build_environment(device: int = 0) -> BuildEnvironment:
    """The running TensorRT version and GPU (cuda-python, else nvidia-smi).

    Raises:
        MissingDependencyError: TensorRT is missing or no GPU can be queried.
    """
    trt = require("tensorrt", extra="gpu")
    try:
        from uniref_deploy.runtime.cuda import device_info

        info = device_info(device)
        return BuildEnvironment(trt.__version__, info.name, info.compute_capability)
    except MissingDependencyError:
        out = _nvidia_smi([f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"])
        if not out or "," not in out:
            raise MissingDependencyError("Cannot query the GPU (no cuda-python, nvidia-smi failed).",
                                         "pip install 'uniref-deploy[gpu]'") from None
        name, cc = (x.strip() for x in out.strip().splitlines()[0].rsplit(",", 1))
        return BuildEnvironment(trt.__version__, name, cc)


# ---------------------------------------------------------------------------------------------------------
# One engine
# ---------------------------------------------------------------------------------------------------------


def _parse_onnx(trt: Any, builder: Any, onnx_path: Path, strongly_typed: bool, trt_logger: Any) -> tuple[Any, Any]:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)] or ["unknown parser error"]
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors[0]}",
                               "check the graph with `polygraphy inspect model`.")
    return network, parser


def _config(trt: Any, builder: Any, engine: EnginePlan, cache_bytes: bytes) -> Any:
    """The builder config: optimization level, flags, timing cache and one profile per bucket."""
    config = builder.create_builder_config()
    config.builder_optimization_level = engine.builder_optimization_level
    if engine.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if engine.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    for plan_profile in engine.profiles:
        profile = builder.create_optimization_profile()
        for name, rng in plan_profile.shapes:
            profile.set_shape(name, rng.min, rng.opt, rng.max)
        config.add_optimization_profile(profile)
    return config


def serialize_engine(onnx_path: str | os.PathLike, engine: EnginePlan, timing_cache: str | os.PathLike) -> Any:
    """Build ``engine`` from ``onnx_path``; return TensorRT's serialised plan (``IHostMemory``, a buffer).

    The timing cache file is read when present and rewritten (atomically) after the build.

    Raises:
        EngineBuildError: the parser or the builder failed.
    """
    trt = require("tensorrt", extra="gpu")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network, _parser = _parse_onnx(trt, builder, Path(onnx_path), engine.strongly_typed, trt_logger)
    cache = Path(timing_cache)
    config = _config(trt, builder, engine, cache.read_bytes() if cache.is_file() else b"")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build {engine.name} from {engine.onnx_file}.",
                               "run with -vv for TensorRT's log; check the graph with `polygraphy inspect model`.")
    atomic_write_bytes(cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return serialized


def _write_hashed(path: Path, data: Any) -> str:
    """Write a buffer to ``path`` and return its sha256 (one pass over the bytes, no re-read)."""
    view = memoryview(data).cast("B")
    with open(path, "wb") as f:
        f.write(view)
    return hashlib.sha256(view).hexdigest()


def _up_to_date(manifest: Manifest, art_dir: Path, engine: EnginePlan, env: BuildEnvironment) -> EngineSpec | None:
    spec = next((e for e in manifest.engines if e.file == engine.engine_file), None)
    if spec is None:
        return None
    p = spec.provenance
    same = (p.get("plan_sha256") == engine.settings_sha256() and p.get("tensorrt_version") == env.tensorrt_version
            and p.get("compute_capability") == env.compute_capability)
    path = art_dir / engine.engine_file
    return spec if same and path.is_file() and sha256_file(path) == spec.sha256 else None


def _check_onnx(manifest: Manifest, art_dir: Path, engine: EnginePlan, verify: bool, verified: set[str]) -> Path:
    graph = next((g for g in manifest.graphs if g.file == engine.onnx_file), None)  # a variant (dit.int8.qdq) too
    graph = graph or manifest.graph(engine.graph, engine.precision)
    if graph.sha256 != engine.onnx_sha256 or graph.file != engine.onnx_file:
        raise ManifestError(
            f"The plan for {engine.name} was made from another {graph.key} graph than the manifest now lists.",
            "make a new plan (`uniref-deploy build ART --dry-run` or without it).",
        )
    if verify and graph.key not in verified:
        manifest.verify_files(art_dir, names=(graph.key,))
        verified.add(graph.key)
    return art_dir / graph.file


def build_engine(art_dir: str | os.PathLike, engine: EnginePlan, env: BuildEnvironment,
                 timing_cache: str | os.PathLike) -> EngineSpec:
    """Build one engine and save it atomically; return its manifest entry.

    Raises:
        EngineBuildError: TensorRT failed (the first line of its message is kept).
    """
    root = Path(art_dir)
    dst = root / engine.engine_file
    start = time.perf_counter()
    try:
        serialized = serialize_engine(root / engine.onnx_file, engine, timing_cache)
        with atomic_path(dst) as tmp:
            sha256 = _write_hashed(tmp, serialized)
        nbytes = memoryview(serialized).nbytes
        del serialized
    except UnirefError:
        raise
    except Exception as err:  # TensorRT raises RuntimeError/TypeError
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EngineBuildError(
            f"TensorRT could not build {engine.name} from {engine.onnx_file}: {first}",
            "run with -vv for TensorRT's log; check the graph with `polygraphy inspect model`.",
        ) from err
    provenance = {
        "tensorrt_version": env.tensorrt_version,
        "gpu_name": env.gpu_name,
        "compute_capability": env.compute_capability,
        "onnx_file": engine.onnx_file,
        "onnx_sha256": engine.onnx_sha256,
        "plan_sha256": engine.settings_sha256(),
        "build_seconds": round(time.perf_counter() - start, 3),
        "engine_bytes": nbytes,
        "builder_optimization_level": engine.builder_optimization_level,
        "strongly_typed": engine.strongly_typed,
        "refittable": engine.refittable,
        "weight_streaming_budget": engine.weight_streaming_budget,
        "profiles": [p.to_dict() for p in engine.profiles],
    }
    return EngineSpec(engine.graph, engine.precision, engine.engine_file, sha256,
                      tuple(b.pixels for b in engine.budgets), provenance)


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------


@writes_artifacts("build")
def build_engines(art_dir: str | os.PathLike, plan: BuildPlan, options: BuildOptions | None = None) -> Manifest:
    """Build every engine of ``plan`` (reusing up-to-date ones) and record them in the manifest.

    Args:
        art_dir (str | os.PathLike): the artifact folder (its manifest lists the ONNX graphs).
        plan (BuildPlan): from ``make_plan``; also written to ``ART/engines/plan.json``.
        options (BuildOptions | None, default None): force / ONNX verification / device.

    Returns:
        Manifest: the saved manifest with the engines and a ``build`` stage record.

    Raises:
        MissingDependencyError: TensorRT or a GPU is missing (see ``check_build_environment``).
        ManifestError: an ONNX file is missing or changed, or the plan is stale.
        EngineBuildError: an engine failed to build (earlier engines stay recorded).
    """
    from tqdm import tqdm

    options = options or BuildOptions()
    reason = check_build_environment()
    if reason is not None:
        raise MissingDependencyError(f"Cannot build TensorRT engines: {reason}.",
                                     "`uniref-deploy build ART --dry-run` prints the plan and polygraphy commands.")
    root = Path(art_dir)
    env = build_environment(options.device)
    manifest = Manifest.load(root)
    save_plan(plan, root)
    timing_cache = root / plan.timing_cache_file
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    logger.info("build: %d engine(s) with TensorRT %s on %s (sm %s)", len(plan.engines), env.tensorrt_version,
                env.gpu_name, env.compute_capability)
    start = time.perf_counter()
    built: list[str] = []
    reused: list[str] = []
    verified: set[str] = set()
    for engine in tqdm(plan.engines, desc="engines", unit="engine", leave=False):
        onnx = _check_onnx(manifest, root, engine, options.verify_onnx, verified)
        spec = None if options.force else _up_to_date(manifest, root, engine, env)
        if spec is not None:
            logger.info("%s is up to date; reused", engine.name)
            reused.append(engine.name)
            continue
        logger.info("building %s from %s", engine.name, onnx)
        spec = build_engine(root, engine, env, timing_cache)
        logger.info("built %s in %.1f s (%d bytes)", engine.name, spec.provenance["build_seconds"],
                    spec.provenance["engine_bytes"])
        built.append(engine.name)
        manifest = manifest.with_engine(spec)
        manifest.save(root)
    record = StageRecord(
        stage=STAGE,
        inputs_sha256=sha256_json(sorted(e.settings_sha256() for e in plan.engines)),
        settings=asdict(plan.options),
        seconds=round(time.perf_counter() - start, 3),
        tool_versions={"tensorrt": env.tensorrt_version, "uniref-deploy": _version("uniref-deploy")},
        results={"built": built, "reused": reused, "gpu_name": env.gpu_name,
                 "compute_capability": env.compute_capability,
                 "skipped": [asdict(s) for s in plan.skipped]},
    )
    manifest = manifest.with_stage(record)
    manifest.save(root)
    logger.info("build: %d built, %d reused in %.1f s", len(built), len(reused), record.seconds)
    return manifest


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
