"""``ART/text/``: the host side's files for the exported prompt encoder (``TEXT_CONTRACT.md``).

    tokenizer.json              copied from the model's processor/ (or tokenizer/); built when only vocab/merges exist
    *_config.json, chat_template*  processor and tokenizer configs, copied verbatim
    config.json                 the text encoder's config, copied verbatim
    embed_tokens.npy            the token-embedding table [vocab, D] float32 (+ embed_tokens.fp16.npy)

The lookup runs on the host (a memory-mapped table): the 7B table is 1.1 GB in fp16, a Gather over it gains
nothing in TensorRT and would sit in GPU memory beside the engines. Every file is hashed into the manifest's
``text`` field.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from uniref_deploy.runtime.encoder_io import EMBED_TABLE, EMBED_TABLE_FP16, TEXT_DIR
from uniref_deploy.runtime.errors import ExportError
from uniref_deploy.runtime.fileio import sha256_file

COPIED = ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json", "special_tokens_map.json",
          "chat_template.json", "chat_template.jinja")
EMBED_CHUNK_ROWS = 8192


def tokenizer_source(model_dir: Path) -> Path:
    """The folder holding the model's tokenizer: processor/ when it has tokenizer files, else tokenizer/."""
    for name in ("processor", "tokenizer"):
        folder = model_dir / name
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
            return folder
    raise ExportError(f"'{model_dir}' has no tokenizer files in processor/ or tokenizer/.",
                      "pass a diffusers Qwen-Image-Edit folder with its tokenizer.")


def write_tokenizer(source: Path, out: Path) -> None:
    """``out/tokenizer.json``: copied when ``source`` has one, else built from vocab.json + merges.txt + the
    added tokens of tokenizer_config.json (transformers' Qwen2 tokenizer, whose backend is a ``tokenizers``
    object: same normalizer, pre-tokenizer and added tokens as the processor uses)."""
    if (source / "tokenizer.json").is_file():
        shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
        return
    if not (source / "merges.txt").is_file():
        raise ExportError(f"'{source}' has vocab.json but no merges.txt.", "the tokenizer folder is incomplete.")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"transformers loaded a slow tokenizer from '{source}'; cannot build tokenizer.json.",
                          "install the `tokenizers` package.")
    backend.save(str(out / "tokenizer.json"))


def write_embedding_table(rows: Callable[[int, int], np.ndarray], shape: tuple[int, int], out: Path,
                          fp16: bool) -> None:
    """Write the [vocab, D] table chunk by chunk (``rows(start, stop)`` gives float32 rows) as .npy files.

    Plain sequential writes (no memory map): memory stays one chunk whatever the table's size.
    """
    tables = [(out / EMBED_TABLE, np.dtype(np.float32))] + ([(out / EMBED_TABLE_FP16, np.dtype(np.float16))] if fp16 else [])
    files = [open(path, "wb") for path, _ in tables]  # noqa: SIM115 (closed below)
    try:
        for f, (_, dtype) in zip(files, tables, strict=True):
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
            np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, shape[0], EMBED_CHUNK_ROWS):
            chunk = rows(start, min(start + EMBED_CHUNK_ROWS, shape[0]))
            for f, (_, dtype) in zip(files, tables, strict=True):
                f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
    finally:
        for f in files:
            f.close()


def write_text_files(model_dir: Path, art: Path, rows: Callable[[int, int], np.ndarray], shape: tuple[int, int],
                     fp16: bool) -> dict[str, str]:
    """Write ``art/text/`` and return {path relative to ``art``: sha256}."""
    out = art / TEXT_DIR
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    source = tokenizer_source(model_dir)
    write_tokenizer(source, out)
    for folder in (model_dir / "processor", model_dir / "tokenizer"):
        for name in COPIED:
            if (folder / name).is_file() and not (out / name).exists():
                shutil.copyfile(folder / name, out / name)
    shutil.copyfile(model_dir / "text_encoder" / "config.json", out / "config.json")
    write_embedding_table(rows, shape, out, fp16)
    return {f"{TEXT_DIR}/{f.name}": sha256_file(f) for f in sorted(out.iterdir()) if f.is_file()}
