"""Seeded, randomly initialised Qwen-Image-Edit-Plus component sets ("presets") built locally, without a hub.

``build_preset("tiny", out_dir)`` writes a complete diffusers-format folder (``model_index.json``, ``transformer/``,
``vae/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``, ``processor/``) that
``diffusers.QwenImageEditPlusPipeline.from_pretrained(out_dir)`` loads and runs on CPU. The weights are random but
fully determined by ``(name, seed)``; ``preset.json`` records name, seed, format version and parameter counts,
and, for a preset built with ``outliers=True``, the injected activation outliers (``presets/outliers.py``).

Two sizes:

- ``tiny``: seconds per CPU edit; every compile stage's tests are built on it.
- ``small``: a ~257M-parameter DiT (12 layers x 768 wide), large enough for meaningful latency and accuracy runs.

Architecture constraints the presets respect (checked here so later stages can rely on them):

- VAE spatial downsample 8 (``len(temperal_downsample) == 3``) and DiT patch 2: one token per 16x16 pixels.
- DiT ``in_channels == 4 * z_dim``, ``out_channels == z_dim``, ``sum(axes_dims_rope) == attention_head_dim``,
  ``joint_attention_dim`` == the text encoder's hidden size.
- The text encoder's ``mrope_section`` sums to half its head dim; its vocabulary covers the tokenizer.
- The tokenizer splits the edit template's system prefix into exactly 64 tokens, as Qwen's tokenizer does, because
  the pipeline drops the first ``prompt_template_encode_start_idx = 64`` hidden states.

Initialisation: diffusers and transformers default initialisers are used unchanged. None of the layers these models
contain is zero-initialised (``proj_out``, ``img_mod``/``txt_mod`` and ``norm_out.linear`` keep PyTorch's default
uniform init; transformers' ``_init_weights`` zeroes only Linear *biases* of the text encoder), so the DiT's
velocity and the text embeddings are non-trivial; the tests check the edit output is non-constant.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from uniref_deploy.runtime._lazy import require
from uniref_deploy.runtime.errors import ExportError, InputError
from uniref_deploy.runtime.pipeline_classes import (
    EDIT_PLUS,
    PIPELINE_CLASSES,
    SYSTEM_PREFIX,
    SYSTEM_PREFIX_TOKENS,
)
from uniref_deploy.runtime.scheduler import QWEN_IMAGE_SCHEDULER_CONFIG

from .outliers import inject_outliers

logger = logging.getLogger(__name__)

PRESET_FORMAT_VERSION = 1
PRESET_FILE = "preset.json"
WEIGHT_COMPONENTS = ("transformer", "vae", "text_encoder")

# The template's system part (runtime/pipeline_classes.py); diffusers drops exactly this many leading tokens.
TEMPLATE_PREFIX = SYSTEM_PREFIX
TEMPLATE_PREFIX_TOKENS = SYSTEM_PREFIX_TOKENS
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen-Image-Edit's scheduler_config.json: one home, runtime/scheduler.py.
SCHEDULER_CONFIG: dict[str, Any] = dict(QWEN_IMAGE_SCHEDULER_CONFIG)

# Tokenizer training text: the pipeline's own template pieces (repeated so every template word becomes one token)
# plus short edit instructions, so ordinary prompts tokenize into words rather than bytes.
_TEMPLATE_PIECES = (
    TEMPLATE_PREFIX.replace("<|im_start|>", "").replace("<|im_end|>", ""),
    "assistant\n",
    "Picture 1: Picture 2: Picture 3: Picture 4: ",
)
_CORPUS = (
    "Make it blue.",
    "make it blue",
    "make it red and make the sky green",
    "change the color of the shirt",
    "Make the sky red and the grass yellow.",
    "Replace the cat with a small brown dog.",
    "Put the person from picture 1 into the room from picture 2.",
    "Change the background to a beach at sunset.",
    "Add a red hat to the man on the left.",
    "Remove the text from the sign and keep the colors.",
    "Turn the photo into a watercolor painting.",
    "The woman is holding a cup of coffee in a bright kitchen.",
    "A green car parked next to an old stone wall.",
    "Make the lighting warmer and softer, like late afternoon sun.",
    "Combine the dress from the first image with the model in the second image.",
    "Rotate the bottle so the label faces the camera.",
    "Draw a white cloud above the mountains.",
    "The dog runs across the field while the children watch.",
    "Keep the face unchanged, but change the hair to short and black.",
    "Write the word HELLO on the board in large letters.",
    "Place the lamp on the wooden table beside the books.",
    "Give the image a vintage look with faded colors and film grain.",
    "Two people are talking on a busy street in the city at night.",
)


@dataclass(frozen=True)
class TransformerSpec:
    """QwenImageTransformer2DModel sizes. ``sum(axes_dims_rope)`` must equal ``attention_head_dim``."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    axes_dims_rope: tuple[int, int, int]


@dataclass(frozen=True)
class VAESpec:
    """AutoencoderKLQwenImage sizes; ``len(dim_mult) == 4`` gives the 8x spatial downsample."""

    base_dim: int
    z_dim: int
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 1


@dataclass(frozen=True)
class TextEncoderSpec:
    """Qwen2.5-VL text model and vision tower sizes. ``sum(mrope_section) == hidden_size // num_heads // 2``."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    mrope_section: tuple[int, int, int]
    vision_hidden_size: int
    vision_depth: int
    vision_heads: int
    vision_intermediate_size: int


@dataclass(frozen=True)
class PresetSpec:
    """Everything that sizes one preset.

    ``tokenizer_vocab`` caps the BPE vocabulary (special tokens included; the built-in corpus runs out of merges at
    ~720 tokens, so both presets get the same tokenizer); ``max_pixels`` caps the processor's condition images
    (the real model allows 1280*28*28; small values keep CPU runs fast).
    """

    name: str
    transformer: TransformerSpec
    vae: VAESpec
    text_encoder: TextEncoderSpec
    tokenizer_vocab: int = 1024
    max_pixels: int = 64 * 28 * 28
    min_pixels: int = 4 * 28 * 28

    def validate(self) -> None:
        """Raise ``InputError`` when the sizes break an architecture constraint listed in the module docstring."""
        t, te = self.transformer, self.text_encoder
        if sum(t.axes_dims_rope) != t.attention_head_dim:
            raise InputError(
                f"Preset '{self.name}': axes_dims_rope {t.axes_dims_rope} must sum to "
                f"attention_head_dim {t.attention_head_dim}."
            )
        if 2 * sum(te.mrope_section) != te.hidden_size // te.num_heads:
            raise InputError(
                f"Preset '{self.name}': mrope_section {te.mrope_section} must sum to half the text "
                f"head dim {te.hidden_size // te.num_heads}."
            )
        if len(self.vae.dim_mult) != 4:
            raise InputError(f"Preset '{self.name}': the VAE needs 4 dim_mult entries (8x downsample).")


PRESETS: dict[str, PresetSpec] = {
    "tiny": PresetSpec(
        name="tiny",
        transformer=TransformerSpec(
            num_layers=2, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6)
        ),
        vae=VAESpec(base_dim=8, z_dim=4),
        text_encoder=TextEncoderSpec(
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            num_kv_heads=2,
            intermediate_size=64,
            mrope_section=(2, 3, 3),
            vision_hidden_size=32,
            vision_depth=1,
            vision_heads=2,
            vision_intermediate_size=64,
        ),
    ),
    "small": PresetSpec(
        name="small",
        transformer=TransformerSpec(
            num_layers=12, num_attention_heads=12, attention_head_dim=64, axes_dims_rope=(16, 24, 24)
        ),
        vae=VAESpec(base_dim=32, z_dim=16),
        text_encoder=TextEncoderSpec(
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=704,
            mrope_section=(8, 12, 12),
            vision_hidden_size=64,
            vision_depth=2,
            vision_heads=4,
            vision_intermediate_size=128,
        ),
        max_pixels=256 * 28 * 28,
    ),
}


def build_preset(
    name: str, out_dir: str | Path, seed: int = 0, pipeline_class: str = EDIT_PLUS, outliers: bool = False
) -> Path:
    """Write preset ``name`` with weights seeded by ``seed`` to ``out_dir`` (atomically) and return ``out_dir``.

    Args:
        name (str): a key of ``PRESETS`` ("tiny" or "small").
        out_dir (str | Path): destination folder; must not exist, be empty, or already hold the same preset.
        seed (int, default 0): seeds every component's random initialisation.
        pipeline_class (str, default Edit-Plus): the diffusers class written to ``model_index.json``, a key of
            ``runtime.pipeline_classes.PIPELINE_CLASSES`` (the components are the same for both).
        outliers (bool, default False): give the DiT's attention and MLP inputs a few outlier channels, as trained
            DiTs have, without changing its output (``presets/outliers.py``); recorded under ``outliers`` in
            ``preset.json``.

    Returns:
        Path: ``out_dir``, loadable by ``from_pretrained`` of ``pipeline_class``.

    Raises:
        InputError: unknown preset name, or ``out_dir`` holds something else.
        MissingDependencyError: torch / diffusers / transformers / tokenizers are not installed.
    """
    if name not in PRESETS:
        raise InputError(f"Unknown preset '{name}'.", hint=f"choose one of {sorted(PRESETS)}")
    if pipeline_class not in PIPELINE_CLASSES:
        raise InputError(f"Unknown pipeline class '{pipeline_class}'.", f"use one of {sorted(PIPELINE_CLASSES)}")
    spec = PRESETS[name]
    spec.validate()
    for module in ("torch", "diffusers", "transformers", "tokenizers", "safetensors"):
        require(module, extra="torch")
    out_dir = Path(out_dir)
    identity = (name, seed, pipeline_class, outliers)
    if _holds_preset(out_dir, identity):
        logger.info("preset %s (seed %d, outliers %s) already in %s; skipping", name, seed, outliers, out_dir)
        return out_dir
    _check_free(out_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger.info("building preset %s (seed %d) into %s", name, seed, out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        outlier_record = _write_components(spec, tmp, seed, pipeline_class, outliers)
        counts = preset_parameter_counts(tmp)
        record = {
            "name": name,
            "seed": seed,
            "pipeline_class": pipeline_class,
            "version": PRESET_FORMAT_VERSION,
            "outliers": outlier_record,
            "parameters": counts,
            "spec": asdict(spec),
            "libraries": _library_versions(),
        }
        (tmp / PRESET_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _publish(tmp, out_dir, identity)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built preset %s in %.1f s", name, time.perf_counter() - start)
    return out_dir


def preset_parameter_counts(out_dir: str | Path) -> dict[str, int]:
    """Count the stored weights of each model component of a preset (or any diffusers-format folder).

    Reads only safetensors headers, so it is fast and needs no model class. Counts every stored tensor element
    (parameters plus persistent buffers; these models keep no persistent buffers).

    Args:
        out_dir (str | Path): a folder with ``transformer/``, ``vae/``, ``text_encoder/`` sub-folders.

    Returns:
        dict[str, int]: ``{component: element count}`` for each component folder holding safetensors files.
    """
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for component in WEIGHT_COMPONENTS:
        files = sorted((Path(out_dir) / component).glob("*.safetensors"))
        if not files:
            continue
        total = 0
        for file in files:
            with safe_open(str(file), framework="numpy") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    total += math.prod(f.get_slice(key).get_shape())
        counts[component] = total
    return counts


def read_preset_record(out_dir: str | Path) -> dict[str, Any] | None:
    """Return the parsed ``preset.json`` of ``out_dir``, or None when there is none (or it is unreadable)."""
    path = Path(out_dir) / PRESET_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- destination handling --------------------------------------------------------------------------------------


def _holds_preset(out_dir: Path, identity: tuple[str, int, str, bool]) -> bool:
    """True when ``out_dir`` already holds the preset (name, seed, pipeline class, outliers) of this version."""
    record = read_preset_record(out_dir)
    if not record:
        return False
    have = (record.get("name"), record.get("seed"), record.get("pipeline_class", EDIT_PLUS), bool(record.get("outliers")))
    return have == identity and record.get("version") == PRESET_FORMAT_VERSION


def _check_free(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        record = read_preset_record(out_dir)
        got = (
            f"preset {record.get('name')!r} seed {record.get('seed')} version {record.get('version')}"
            f"{' with outliers' if record.get('outliers') else ''}"
            if record
            else "other content"
        )
        raise InputError(
            f"Cannot build the preset into '{out_dir}': it already exists and holds {got}.",
            hint="pick an empty or non-existent folder",
        )


def _publish(tmp: Path, out_dir: Path, identity: tuple[str, int, str, bool]) -> None:
    """Rename the finished build onto ``out_dir``; a concurrent identical build that won the race is accepted."""
    with contextlib.suppress(OSError):
        out_dir.rmdir()  # an empty destination folder is replaced
    try:
        os.rename(tmp, out_dir)
    except OSError as err:
        if not _holds_preset(out_dir, identity):
            raise InputError(
                f"Cannot move the built preset into '{out_dir}' ({err}).",
                hint="pick an empty or non-existent folder",
            ) from err


def _library_versions() -> dict[str, str]:
    import diffusers
    import tokenizers
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


# --- component builders ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int, component: str) -> Iterator[None]:
    """Seed torch's global RNG for one component, restoring the caller's RNG state afterwards.

    Each component gets its own stream (seed mixed with a hash of its name), so resizing one leaves the others'
    weights unchanged.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(component.encode())) % 2**63)
        yield


def _write_components(
    spec: PresetSpec, folder: Path, seed: int, pipeline_class: str, outliers: bool
) -> dict[str, Any] | None:
    """Build and save every component; return the outlier record (None without outliers)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = _build_tokenizer(spec)
    transformer = _build_transformer(spec, seed)
    outlier_record = inject_outliers(transformer, seed) if outliers else None
    pipe = getattr(diffusers, pipeline_class)(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=_build_vae(spec, seed),
        text_encoder=_build_text_encoder(spec, tokenizer, seed),
        tokenizer=tokenizer,
        processor=_build_processor(spec, tokenizer),
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return outlier_record


def _build_tokenizer(spec: PresetSpec) -> Any:
    """Train a byte-level BPE with Qwen2's pre-tokenizer and wrap it as a ``Qwen2Tokenizer``."""
    from tokenizers import AddedToken, Tokenizer, models, trainers
    from transformers import Qwen2Tokenizer

    base = Qwen2Tokenizer()  # borrow Qwen2's normalizer, pre-tokenizer and decoder
    backend = Tokenizer(models.BPE())
    backend.normalizer = base.backend_tokenizer.normalizer
    backend.pre_tokenizer = base.backend_tokenizer.pre_tokenizer
    backend.decoder = base.backend_tokenizer.decoder
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer_vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=_byte_alphabet(),
        show_progress=False,
    )
    lines = [*_CORPUS * 4, *_TEMPLATE_PIECES * 50]
    backend.train_from_iterator(lines, trainer=trainer, length=len(lines))
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True
    )
    n_prefix = len(tokenizer(TEMPLATE_PREFIX)["input_ids"])
    if n_prefix != TEMPLATE_PREFIX_TOKENS:  # a builder bug (corpus/vocab changed), not user input
        raise ExportError(
            f"The trained tokenizer splits the template prefix into {n_prefix} tokens, expected "
            f"{TEMPLATE_PREFIX_TOKENS} (the pipeline drops that many)."
        )
    return tokenizer


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _build_processor(spec: PresetSpec, tokenizer: Any) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    return Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor
    )


def _build_text_encoder(spec: PresetSpec, tokenizer: Any, seed: int) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    te = spec.text_encoder
    vocab_size = -(-len(tokenizer) // 64) * 64  # covers the tokenizer, added tokens included
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": te.hidden_size,
            "intermediate_size": te.intermediate_size,
            "num_hidden_layers": te.num_layers,
            "num_attention_heads": te.num_heads,
            "num_key_value_heads": te.num_kv_heads,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": list(te.mrope_section),
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": te.vision_depth,
            "hidden_size": te.vision_hidden_size,
            "intermediate_size": te.vision_intermediate_size,
            "num_heads": te.vision_heads,
            "out_hidden_size": te.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "fullatt_block_indexes": [te.vision_depth - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with _seeded(seed, "text_encoder"):
        return Qwen2_5_VLForConditionalGeneration(config).eval()


def _build_transformer(spec: PresetSpec, seed: int) -> Any:
    from diffusers import QwenImageTransformer2DModel

    t = spec.transformer
    with _seeded(seed, "transformer"):
        return QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * spec.vae.z_dim,
            out_channels=spec.vae.z_dim,
            num_layers=t.num_layers,
            attention_head_dim=t.attention_head_dim,
            num_attention_heads=t.num_attention_heads,
            joint_attention_dim=spec.text_encoder.hidden_size,
            axes_dims_rope=t.axes_dims_rope,
        ).eval()


def _build_vae(spec: PresetSpec, seed: int) -> Any:
    import numpy as np
    from diffusers import AutoencoderKLQwenImage

    v = spec.vae
    # Fixed, seeded latent statistics (std > 0), rounded like the real model's config values.
    rng = np.random.default_rng([seed, zlib.crc32(b"latents")])
    latents_mean = [round(float(x), 4) for x in rng.uniform(-1.0, 1.0, v.z_dim)]
    latents_std = [round(float(x), 4) for x in rng.uniform(0.5, 3.0, v.z_dim)]
    with _seeded(seed, "vae"):
        return AutoencoderKLQwenImage(
            base_dim=v.base_dim,
            z_dim=v.z_dim,
            dim_mult=list(v.dim_mult),
            num_res_blocks=v.num_res_blocks,
            temperal_downsample=[False, True, True],
            latents_mean=latents_mean,
            latents_std=latents_std,
        ).eval()
