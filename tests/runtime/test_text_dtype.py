"""The text encoder's dtype option: "auto" resolves per machine, the choice is recorded and used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from uniref_deploy.runtime.errors import InputError  # noqa: E402
from uniref_deploy.runtime.pipeline import Pipeline  # noqa: E402
from uniref_deploy.runtime.text import resolve_text_dtype  # noqa: E402

PROMPT = "Make the sky red and the grass yellow."


def test_auto_follows_the_machine():
    import torch

    if torch.cuda.is_available():
        expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    else:
        flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
        expected = "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"
    assert resolve_text_dtype("auto") == expected
    assert resolve_text_dtype("float32") == "float32" and resolve_text_dtype("bfloat16") == "bfloat16"
    with pytest.raises(InputError, match="text-encoder dtype"):
        resolve_text_dtype("float16")


def test_bfloat16_encoder_runs_in_bfloat16_close_to_float32(tiny_model_dir):
    import torch
    from PIL import Image

    ref = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    encoded = {}
    for dtype in ("float32", "bfloat16"):
        pipe = Pipeline.from_pretrained(tiny_model_dir, text_encoder_dtype=dtype)
        assert pipe.config.text_encoder_dtype == dtype
        embeds, _ = pipe.text_encoder.encode(PROMPT, [ref])
        assert pipe.text_encoder._model.dtype == getattr(torch, dtype)
        encoded[dtype] = embeds
    a, b = encoded["float32"], encoded["bfloat16"]
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    assert 0 < rel < 0.05, f"bf16 vs fp32 embeddings differ by {rel:.3g} of scale"
