"""GPU memory plan: for each engine and profile, weight bytes, an activation estimate, and whether it fits.

Weights are counted from the ONNX initializers (and ``Constant`` tensors) at their stored type, read from the graph
proto without loading external data: an fp16 graph counts 2 bytes a weight, the FP8 and INT8 Q/DQ graphs 1 byte
for their float8 / int8 weights plus their scales. The engine holds its weights once, whatever its number of profiles.

Activations (at a profile's max shapes, assuming fused attention, so no ``tokens x tokens`` score tensor) are an
analytic upper estimate of the peak live tensors inside one layer; TensorRT reuses activation memory across layers:

* DiT: ``B * T * D * e * 16`` plus the inputs (``B * txt * joint_dim * e``), with ``B`` the batch, ``T`` image +
  text tokens, ``D = heads * head_dim`` and ``e`` bytes per activation (4 for fp32 and int8 graphs, else 2). The 16 counts
  the residual stream, its modulated norm, q/k/v and their RoPE'd copies (5), the attention output and the MLP's
  up projection and GELU output (4 + 4).
* Prompt encoder (``text_vision`` over ``N`` patches, ``text_encoder`` over ``L`` tokens, widths and heads from
  ``ART/text/config.json``): ``S * D * e * 16`` like the DiT, plus the explicit float32 attention scores and
  weights of one layer (``2 * H * S * S * 4``: the graphs add a mask, so attention is not assumed fused) and the
  float32 mask inputs (vision: two ``N x N``, LM: one ``L x L``).
* VAE encoder/decoder: ``H * W * C * e * 8`` at the full-resolution stage (``C`` the channels of the first conv of
  the encoder, the last conv of the decoder, read from the graph): a causal 3-D conv pads one frame to three
  (x3), plus its output, the norm and the residual.

Every engine also keeps ``RESERVE_BYTES`` (CUDA context, cuBLAS/cuDNN workspaces, TensorRT's scratch). An
(engine, profile) *fits* when ``weights + activations + reserve <= gpu``. A DiT profile that does not fit can run
with weight streaming when ``activations + reserve + 2 * largest weight tensor <= gpu`` (one tensor in flight, one
prefetched); the budget is what is left for resident weights. A bucket is *runnable* when every engine fits (the
DiT possibly streamed) at that profile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.encoder_io import (
    PATCHES,
    TEXT_DIR,
    TEXT_ENCODER,
    TEXT_LEN,
    TEXT_VISION,
    EncoderDims,
)
from uniref_deploy.runtime.errors import InputError, ManifestError
from uniref_deploy.runtime.graphs import (
    BATCH,
    DIT,
    HEIGHT,
    IMG_TOKENS,
    LATENT_HEIGHT,
    LATENT_WIDTH,
    TXT_TOKENS,
    WIDTH,
)
from uniref_deploy.runtime.manifest import ModelConfig

from .records import BuildPlan, EnginePlan

GIB = 1 << 30
RESERVE_BYTES = GIB
DIT_ACTIVATION_FACTOR = 16
VAE_ACTIVATION_FACTOR = 8

# ONNX TensorProto.DataType -> bytes per element (int4/uint4 pack two per byte; FLOAT4E2M1 too)
_ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2,
               17: 1, 18: 1, 19: 1, 20: 1, 21: 0.5, 22: 0.5, 23: 0.5}


@dataclass(frozen=True)
class WeightStats:
    """Weight bytes of one graph and its largest single tensor (the unit weight streaming moves)."""

    total: int
    largest: int
    conv_channels: tuple[int, int] = (0, 0)  # (first conv out-channels, last conv in-channels); 0 when no conv


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _tensor_bytes(t) -> int:
    if t.data_type not in _ITEM_BYTES:
        raise ManifestError(f"Initializer '{t.name}' has ONNX data type {t.data_type}, which the memory plan "
                            "cannot size.", "re-export the graph with this version of uniref-deploy.")
    return int(_numel(t.dims) * _ITEM_BYTES[t.data_type])


def onnx_weight_stats(path: str | Path) -> WeightStats:
    """Weight bytes of an ONNX file from its initializers' types and shapes (external data is not read).

    Raises:
        ManifestError: the file is missing or not an ONNX model.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - OSError, protobuf's DecodeError
        raise ManifestError(f"Cannot read ONNX graph '{path}' ({type(err).__name__}).",
                            "re-run `uniref-deploy export`.") from err
    graph = model.graph
    tensors = list(graph.initializer)
    tensors += [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    sizes = [_tensor_bytes(t) for t in tensors]
    inits = {t.name: t for t in graph.initializer}
    conv_w = [inits[n.input[1]].dims for n in graph.node
              if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits]
    channels = (int(conv_w[0][0]), int(conv_w[-1][1])) if conv_w else (0, 0)
    return WeightStats(sum(sizes), max(sizes, default=0), channels)


def text_activation_bytes(graph: str, axes: Mapping[str, int], dims: EncoderDims, e: int) -> int:
    """Activation estimate of a prompt-encoder graph (module docstring)."""
    if graph == TEXT_VISION:
        n, width, heads, masks = axes[PATCHES], dims.vision_hidden, dims.vision_heads, 2
    else:
        n, width, heads, masks = axes[TEXT_LEN], dims.hidden, dims.heads, 1
    return int(n * width * e * DIT_ACTIVATION_FACTOR + (2 * heads + masks) * n * n * 4)


def activation_bytes(graph: str, axes: Mapping[str, int], model: ModelConfig, weights: WeightStats,
                     precision: str, text_dims: EncoderDims | None = None) -> int:
    """Activation estimate of ``graph`` at axis sizes ``axes`` (see the module docstring for the formulas)."""
    e = 4 if precision in ("fp32", "int8") else 2  # the int8 Q/DQ graph keeps fp32 between its int8 GEMMs
    if graph in (TEXT_VISION, TEXT_ENCODER):
        if text_dims is None:
            raise ManifestError(f"The memory plan needs {TEXT_DIR}/config.json to size the {graph} engine.",
                                "re-run `uniref-deploy export`.")
        return text_activation_bytes(graph, axes, text_dims, e)
    batch = axes.get(BATCH, 1)
    if graph == DIT:
        t = model.transformer
        width = int(t.get("num_attention_heads", 24)) * int(t.get("attention_head_dim", 128))
        tokens = axes[IMG_TOKENS] + axes[TXT_TOKENS]
        text_in = batch * axes[TXT_TOKENS] * model.text_hidden_size * e
        return int(batch * tokens * width * e * DIT_ACTIVATION_FACTOR + text_in)
    scale = model.vae_scale_factor
    if LATENT_HEIGHT in axes:
        pixels, channels = axes[LATENT_HEIGHT] * axes[LATENT_WIDTH] * scale * scale, weights.conv_channels[1]
    else:
        pixels, channels = axes[HEIGHT] * axes[WIDTH], weights.conv_channels[0]
    return int(batch * pixels * max(channels, 1) * e * VAE_ACTIVATION_FACTOR)


@dataclass(frozen=True)
class ProfileMemory:
    """Memory of one (engine, profile): bytes needed, whether it fits, and the streaming budget that would."""

    budget: Budget
    activation_bytes: int
    need_bytes: int
    fits: bool
    streaming_budget: int | None  # resident weight bytes with weight streaming; None: fits, or cannot stream

    @property
    def runnable(self) -> bool:
        return self.fits or self.streaming_budget is not None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["budget"] = self.budget.pixels
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ProfileMemory:
        return cls(**{**d, "budget": Budget.from_pixels(int(d["budget"]))})


@dataclass(frozen=True)
class EngineMemory:
    """Weights of one engine and the memory of each of its profiles (profile order)."""

    engine: str
    weight_bytes: int
    largest_weight_bytes: int
    profiles: tuple[ProfileMemory, ...]

    def to_dict(self) -> dict:
        return {"engine": self.engine, "weight_bytes": self.weight_bytes,
                "largest_weight_bytes": self.largest_weight_bytes, "profiles": [p.to_dict() for p in self.profiles]}

    @classmethod
    def from_dict(cls, d: Mapping) -> EngineMemory:
        return cls(d["engine"], int(d["weight_bytes"]), int(d["largest_weight_bytes"]),
                   tuple(ProfileMemory.from_dict(p) for p in d["profiles"]))


@dataclass(frozen=True)
class MemoryPlan:
    """The memory plan of a build plan for one GPU size."""

    gpu_bytes: int
    reserve_bytes: int
    engines: tuple[EngineMemory, ...]

    def runnable_budgets(self) -> tuple[Budget, ...]:
        """Buckets where every engine fits (the DiT possibly with weight streaming)."""
        budgets = sorted({p.budget for e in self.engines for p in e.profiles})
        return tuple(b for b in budgets
                     if all(p.runnable for e in self.engines for p in e.profiles if p.budget == b))

    def to_dict(self) -> dict:
        return {"gpu_bytes": self.gpu_bytes, "reserve_bytes": self.reserve_bytes,
                "engines": [e.to_dict() for e in self.engines]}

    @classmethod
    def from_dict(cls, d: Mapping) -> MemoryPlan:
        return cls(int(d["gpu_bytes"]), int(d["reserve_bytes"]), tuple(EngineMemory.from_dict(e) for e in d["engines"]))


def profile_memory(budget: Budget, activations: int, weights: WeightStats, gpu_bytes: int, streamable: bool,
                   reserve: int = RESERVE_BYTES) -> ProfileMemory:
    """Whether ``weights`` + ``activations`` + ``reserve`` fit ``gpu_bytes``, else the weight-streaming budget."""
    need = weights.total + activations + reserve
    fits = need <= gpu_bytes
    stream = None
    if not fits and streamable:
        left = gpu_bytes - activations - reserve - 2 * weights.largest
        if left >= 0:
            stream = min(left, weights.total)
    return ProfileMemory(budget, activations, need, fits, stream)


def engine_memory(engine: EnginePlan, model: ModelConfig, weights: WeightStats, gpu_bytes: int,
                  reserve: int = RESERVE_BYTES, text_dims: EncoderDims | None = None) -> EngineMemory:
    """The memory of every profile of ``engine`` (at each profile's max axis sizes)."""
    profiles = []
    for p in engine.profiles:
        axes = {name: rng.max for name, rng in p.axes}
        act = activation_bytes(engine.graph, axes, model, weights, engine.precision, text_dims)
        profiles.append(profile_memory(p.budget, act, weights, gpu_bytes, engine.graph == DIT, reserve))
    return EngineMemory(engine.name, weights.total, weights.largest, tuple(profiles))


def memory_plan(plan: BuildPlan, model: ModelConfig, art_dir: str | Path, gpu_gib: float,
                reserve: int = RESERVE_BYTES) -> MemoryPlan:
    """The memory plan of ``plan`` on a GPU of ``gpu_gib`` GiB, weights read from the engines' ONNX files.

    Raises:
        InputError: ``gpu_gib`` is not positive, or no bucket is runnable on it.
        ManifestError: an engine's ONNX file cannot be read.
    """
    if not gpu_gib > 0:
        raise InputError(f"--gpu-memory must be a positive number of GiB, got {gpu_gib}.", "e.g. --gpu-memory 80.")
    gpu = int(gpu_gib * GIB)
    root = Path(art_dir)
    dims = _text_dims(root)
    mem = MemoryPlan(gpu, reserve, tuple(
        engine_memory(e, model, onnx_weight_stats(root / e.onnx_file), gpu, reserve, dims) for e in plan.engines))
    if mem.engines and not mem.runnable_budgets():
        worst = min((max(p.need_bytes for e in mem.engines for p in e.profiles if p.budget == b), b)
                    for b in {p.budget for e in mem.engines for p in e.profiles})
        raise InputError(
            f"--gpu-memory {gpu_gib:g} GiB fits no bucket, even with DiT weight streaming (bucket {worst[1].name} "
            f"needs {worst[0] / GIB:.1f} GiB without streaming).",
            "pass a larger --gpu-memory, smaller --budgets, or build the fp8 DiT.",
        )
    return mem


def _text_dims(root: Path) -> EncoderDims | None:
    """The prompt encoder's sizes from ``ART/text/config.json`` (None when the artifacts have no text graphs)."""
    import json

    path = root / TEXT_DIR / "config.json"
    return EncoderDims.from_config(json.loads(path.read_text())) if path.is_file() else None


def format_memory(mem: MemoryPlan) -> str:
    """The memory plan as a text table: engine, profile, weights, activations, need, fits / streaming budget."""
    rows = [("engine", "profile", "weights GiB", "activations GiB", "need GiB", f"fits {mem.gpu_bytes / GIB:g} GiB")]
    for e in mem.engines:
        for i, p in enumerate(e.profiles):
            verdict = "yes" if p.fits else (f"stream, budget {p.streaming_budget / GIB:.2f} GiB"
                                             if p.streaming_budget is not None else "no")
            rows.append((e.engine if i == 0 else "", f"{i}: b{p.budget.name}", f"{e.weight_bytes / GIB:.2f}",
                         f"{p.activation_bytes / GIB:.2f}", f"{p.need_bytes / GIB:.2f}", verdict))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [f"memory plan (reserve {mem.reserve_bytes / GIB:g} GiB per engine; fused attention assumed in the DiT):"]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in range(len(r))).rstrip() for r in rows]
    lines.append("runnable buckets: " + (", ".join(b.name for b in mem.runnable_budgets()) or "none"))
    return "\n".join(lines)
