"""The compiled prompt encoder: host tokens/patches/positions, then the exported ``text_vision`` and
``text_encoder`` graphs; returns what ``QwenPromptEncoder`` returns, without torch or transformers.

Steps per prompt: template + tokenize + preprocess (``TextHost``); token embeddings looked up on the host from
the memory-mapped ``embed_tokens.npy``; ``text_vision`` on all references' patches at once; its image embeddings
written over the image-token rows; ``text_encoder`` with the M-RoPE tables and a causal mask; the template's first
``drop_tokens`` rows dropped. The two graphs are plain callables (feeds -> outputs), so any backend (ONNX Runtime
here, OpenVINO or TensorRT later) can supply them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError, ManifestError
from .fileio import sha256_file
from .images import image_digest, resize
from .manifest import Manifest
from .pipeline_classes import CONDITION_IMAGE_AREA, EDIT_PLUS, PIPELINE_CLASSES, PipelineClass
from .text import condition_images
from .text_host import HostInputs, TextHost
from .text_positions import causal_mask, mrope_tables

__all__ = ["TEXT_ENCODER_GRAPH", "TEXT_VISION_GRAPH", "CompiledPromptEncoder", "GraphRunner", "text_record"]

TEXT_VISION_GRAPH = "text_vision"
TEXT_ENCODER_GRAPH = "text_encoder"
GraphRunner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


class CompiledPromptEncoder:
    """Prompt embeddings from the two exported text graphs.

    Args:
        host: tokenizer, image processor and position logic (``TextHost``).
        embed_table: the token-embedding table [vocab, D] (a memmap is fine).
        run_vision: feeds -> {"image_embeds": [M, D]} (the ``text_vision`` graph).
        run_encoder: feeds -> {"last_hidden_state": [1, L, D]} (the ``text_encoder`` graph).
        vision_max_patches: most vision patches the vision graph takes (its profile); None: no limit.
        max_text_len: longest templated sequence the encoder graph takes; None: no limit.
        condition_area: pixel area of the Edit-Plus condition images (384²).
        pipeline: the model's ``PipelineClass``; Edit-Plus by default.
        cache_size: (prompt, images) embeddings kept in memory.
        dtypes: numpy dtype per graph input name (default float32 for float inputs).
    """

    def __init__(self, host: TextHost, embed_table: np.ndarray, run_vision: GraphRunner, run_encoder: GraphRunner,
                 vision_max_patches: int | None = None, max_text_len: int | None = None,
                 condition_area: int = CONDITION_IMAGE_AREA, pipeline: PipelineClass = PIPELINE_CLASSES[EDIT_PLUS],
                 cache_size: int = 16, dtypes: Mapping[str, np.dtype] | None = None):
        if embed_table.ndim != 2 or embed_table.shape[1] != host.config.hidden_size:
            raise ManifestError(f"The token-embedding table has shape {embed_table.shape}, expected "
                                f"(vocab, {host.config.hidden_size}).", "re-export the artifacts.")
        self.host, self.embed_table = host, embed_table
        self.run_vision, self.run_encoder = run_vision, run_encoder
        self.vision_max_patches, self.max_text_len = vision_max_patches, max_text_len
        self.condition_area, self.pipeline = condition_area, pipeline
        self.dtypes = dict(dtypes or {})
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._prepared: OrderedDict[str, HostInputs] = OrderedDict()
        self._cache_size = cache_size

    # ---- inputs -------------------------------------------------------------------------------------------
    def condition(self, images: Sequence[Image.Image],
                  vae_sizes: Sequence[tuple[int, int]] | None = None) -> list[Image.Image]:
        """The vision tower's images: at ``condition_area`` (Edit-Plus) or each reference's VAE (w, h) (Edit)."""
        if self.pipeline.condition_area is not None:
            return condition_images(images, self.condition_area)
        if vae_sizes is None or len(vae_sizes) != len(images):
            raise InputError(f"{self.pipeline.name} conditions on each reference at its VAE size; none was given.",
                             "pass vae_sizes (the packed reference sizes).")
        return [resize(img, w, h) for img, (w, h) in zip(images, vae_sizes, strict=True)]

    def key(self, prompt: str, images: Sequence[Image.Image], vae_sizes: Sequence[tuple[int, int]] | None = None,
            image_keys: Sequence[str] | None = None) -> str:
        """Content key of one encoding: the prompt, one digest per reference, and what shapes the conditioning."""
        h = hashlib.sha256(prompt.encode())
        h.update(f"|{self.pipeline.name}|{self.condition_area}|{self.host.positions}|".encode())
        for digest in image_keys if image_keys is not None else [image_digest(im) for im in images]:
            h.update(digest.encode())
        if self.pipeline.condition_area is None:
            h.update(repr(list(vae_sizes or [])).encode())
        return h.hexdigest()

    def check(self, prompt: str, images: Sequence[Image.Image], vae_sizes: Sequence[tuple[int, int]] | None = None,
              image_keys: Sequence[str] | None = None) -> None:
        """Prepare and check one prompt (token limit, vision profile, images) before any model runs.

        Raises:
            InputError: a prompt over the token limit, more vision patches than the graph's profile holds, an
                image the processor cannot take.
        """
        key = self.key(prompt, images, vae_sizes, image_keys)
        if key not in self._cache:
            self._host_inputs(key, prompt, images, vae_sizes)

    def _host_inputs(self, key: str, prompt: str, images: Sequence[Image.Image],
                     vae_sizes: Sequence[tuple[int, int]] | None) -> HostInputs:
        if key in self._prepared:
            return self._prepared[key]
        prepared = self.host.prepare(prompt, self.condition(images, vae_sizes), self.pipeline)
        patches = len(prepared.pixel_patches)
        if self.vision_max_patches is not None and patches > self.vision_max_patches:
            raise InputError(f"{len(images)} reference(s) give {patches} vision patches, over the "
                             f"{self.vision_max_patches} the compiled vision graph holds.",
                             "pass fewer references, or re-export with a larger vision profile.")
        if self.max_text_len is not None and len(prepared.input_ids) > self.max_text_len:
            raise InputError(f"The templated prompt is {len(prepared.input_ids)} tokens, over the "
                             f"{self.max_text_len} the compiled text encoder holds.", "shorten the prompt.")
        self._prepared[key] = prepared
        if len(self._prepared) > 4:
            self._prepared.popitem(last=False)
        return prepared

    # ---- encode -------------------------------------------------------------------------------------------
    def encode(self, prompt: str, images: Sequence[Image.Image], vae_sizes: Sequence[tuple[int, int]] | None = None,
               image_keys: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [1, L, D] float32 and mask [1, L] bool for ``prompt`` with the references ``images``.

        ``image_keys`` (one content digest per reference, ``images.image_digest``) saves hashing them again.
        """
        key = self.key(prompt, images, vae_sizes, image_keys)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        inputs = self._host_inputs(key, prompt, images, vae_sizes)
        self._prepared.pop(key, None)
        hidden = self.hidden_states(inputs)
        embeds = np.ascontiguousarray(hidden[0, self.pipeline.drop_tokens:], dtype=np.float32)[None]
        result = (embeds, np.ones(embeds.shape[:2], dtype=bool))
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result

    def input_embeds(self, inputs: HostInputs) -> np.ndarray:
        """[1, L, D] float32 token embeddings with the vision tower's output at the image-token rows."""
        embeds = np.asarray(self.embed_table[inputs.input_ids], dtype=np.float32)
        is_image = inputs.input_ids == self.host.config.image_token_id
        if len(inputs.pixel_patches):
            feeds = {"pixel_patches": inputs.pixel_patches, **inputs.vision}
            image_embeds = np.asarray(self.run_vision(self._cast(feeds))["image_embeds"], dtype=np.float32)
            if image_embeds.shape[0] != int(is_image.sum()):
                raise ManifestError(f"The vision graph returned {image_embeds.shape[0]} image embeddings for "
                                    f"{int(is_image.sum())} image tokens.", "re-export the artifacts.")
            embeds[is_image] = image_embeds
        return embeds[None]

    def hidden_states(self, inputs: HostInputs) -> np.ndarray:
        """The encoder graph's last hidden state [1, L, D] (template included)."""
        cos, sin = mrope_tables(inputs.positions, self.host.config)
        feeds = {"inputs_embeds": self.input_embeds(inputs), "rope_cos": cos, "rope_sin": sin,
                 "attention_mask": causal_mask(len(inputs.input_ids))}
        return np.asarray(self.run_encoder(self._cast(feeds))["last_hidden_state"], dtype=np.float32)

    def _cast(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.astype(self.dtypes[k], copy=False) if k in self.dtypes else v for k, v in feeds.items()}

    # ---- artifacts ----------------------------------------------------------------------------------------
    @classmethod
    def from_artifacts(cls, art_dir: str | os.PathLike, manifest: Manifest,
                       runners: Callable[[str], tuple[GraphRunner, Mapping[str, np.dtype]]],
                       condition_area: int = CONDITION_IMAGE_AREA, pipeline: PipelineClass = PIPELINE_CLASSES[EDIT_PLUS],
                       positions: str = "mrope") -> CompiledPromptEncoder:
        """The encoder over an artifact folder; ``runners(graph_name)`` gives (run callable, input dtypes).

        Raises:
            ManifestError: the artifacts have no ``text`` record or its files are missing.
        """
        record = text_record(art_dir, manifest)
        if record is None:
            raise ManifestError(f"The artifacts in '{art_dir}' hold no compiled text encoder.",
                                "re-export with the text graphs, or use the transformers text encoder.")
        text_dir = Path(art_dir) / record.get("dir", "text")
        table_path = text_dir / "embed_tokens.npy"
        for rel, sha in record.get("files", {}).items():  # tokenizer, configs and table, hashed like graphs
            path = Path(art_dir) / rel
            if not path.is_file() or sha256_file(path) != sha:
                raise ManifestError(f"Text-encoder file '{path}' is missing or does not match the manifest's sha256.",
                                    "re-run `uniref-deploy export`.")
        if not table_path.is_file():
            raise ManifestError(f"'{table_path}' is missing.", "re-run the export.")
        run_vision, vision_types = runners(TEXT_VISION_GRAPH)
        run_encoder, encoder_types = runners(TEXT_ENCODER_GRAPH)
        return cls(TextHost.from_dir(text_dir, positions), np.load(table_path, mmap_mode="r"), run_vision,
                   run_encoder, vision_max_patches=record.get("vision_max_patches"),
                   max_text_len=record.get("max_text_len"), condition_area=condition_area, pipeline=pipeline,
                   dtypes={**vision_types, **encoder_types})


def text_record(art_dir: str | os.PathLike, manifest: Manifest | None = None) -> dict | None:
    """The manifest's ``text`` record (dir, files, vision_max_patches, max_text_len), or None without one."""
    record = getattr(manifest, "text", None)
    if record is None:
        try:
            record = json.loads((Path(art_dir) / "manifest.json").read_text()).get("text")
        except (OSError, ValueError):
            return None
    return dict(record) if record else None
