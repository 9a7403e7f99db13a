"""Tests for presets/seeded.py: the locally built, seeded Qwen-Image-Edit-Plus component sets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from uniref_deploy.presets.seeded import (  # noqa: E402
    PRESET_FILE,
    PRESET_FORMAT_VERSION,
    PRESETS,
    SPECIAL_TOKENS,
    TEMPLATE_PREFIX,
    TEMPLATE_PREFIX_TOKENS,
    PresetSpec,
    build_preset,
    preset_parameter_counts,
)
from uniref_deploy.runtime.errors import InputError  # noqa: E402

# Documented size of the small preset's DiT (12 layers x 768 wide): ~257M parameters.
SMALL_TRANSFORMER_PARAMS = (240_000_000, 280_000_000)
WEIGHT_FILES = (
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def small_pipeline_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink diffusers' per-reference resize targets so CPU edits stay fast.

    QwenImageEditPlusPipeline resizes every reference to area VAE_IMAGE_SIZE (1024^2) for the VAE and
    CONDITION_IMAGE_SIZE (384^2) for the text encoder's vision tower; these module constants are patched to
    128^2 / 64^2 here. The pipeline logic is unchanged; only the tensors are smaller.
    """
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", 128 * 128)
    monkeypatch.setattr(edit_plus, "CONDITION_IMAGE_SIZE", 64 * 64)


def _references() -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
    ]


def _edit(model_dir: Path) -> np.ndarray:
    import torch
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        image=_references(),
        prompt="make it blue",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return out.images[0]


def test_tiny_preset_runs_a_two_reference_edit(tiny_model_dir: Path, small_pipeline_sizes: None) -> None:
    image = _edit(tiny_model_dir)
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 1e-3, "the edit output is constant: a zero-initialised layer?"


def test_tiny_config_invariants(tiny_model_dir: Path) -> None:
    transformer = json.loads((tiny_model_dir / "transformer/config.json").read_text())
    vae = json.loads((tiny_model_dir / "vae/config.json").read_text())
    text = json.loads((tiny_model_dir / "text_encoder/config.json").read_text())
    scheduler = json.loads((tiny_model_dir / "scheduler/scheduler_config.json").read_text())

    z_dim = vae["z_dim"]
    assert transformer["in_channels"] == 4 * z_dim
    assert transformer["out_channels"] == z_dim
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    assert transformer["joint_attention_dim"] == text["text_config"]["hidden_size"]
    assert 2 ** len(vae["temperal_downsample"]) == 8
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == z_dim
    assert min(vae["latents_std"]) > 0
    assert text["vision_config"]["out_hidden_size"] == text["text_config"]["hidden_size"]
    assert scheduler["use_dynamic_shifting"] and scheduler["time_shift_type"] == "exponential"
    assert (scheduler["max_image_seq_len"], scheduler["max_shift"], scheduler["shift_terminal"]) == (
        8192,
        0.9,
        0.02,
    )


def test_template_prefix_is_exactly_64_tokens(tiny_model_dir: Path) -> None:
    from diffusers import QwenImageEditPlusPipeline
    from transformers import AutoTokenizer, Qwen2VLProcessor

    # Guard against diffusers changing its template: our prefix must be the one the pipeline drops.
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_model_dir)
    assert pipe.prompt_template_encode.split("{}")[0] == TEMPLATE_PREFIX
    assert pipe.prompt_template_encode_start_idx == TEMPLATE_PREFIX_TOKENS == 64

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    processor = Qwen2VLProcessor.from_pretrained(tiny_model_dir / "processor")
    for tok in (tokenizer, processor.tokenizer, pipe.tokenizer):
        assert len(tok(TEMPLATE_PREFIX)["input_ids"]) == 64

    text = json.loads((tiny_model_dir / "text_encoder/config.json").read_text())
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert tokenizer("<|vision_start|><|image_pad|><|vision_end|>")["input_ids"] == [
        ids["<|vision_start|>"],
        ids["<|image_pad|>"],
        ids["<|vision_end|>"],
    ]
    assert text["image_token_id"] == ids["<|image_pad|>"] == processor.image_token_id
    assert text["video_token_id"] == ids["<|video_pad|>"]
    assert text["vision_start_token_id"] == ids["<|vision_start|>"]
    assert text["vision_end_token_id"] == ids["<|vision_end|>"]
    assert text["text_config"]["vocab_size"] >= len(tokenizer)


def test_same_seed_gives_identical_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_preset("tiny", tmp_path / "again", seed=0)
    other = build_preset("tiny", tmp_path / "other", seed=1)
    for rel in WEIGHT_FILES:
        assert _sha256(again / rel) == _sha256(tiny_model_dir / rel), rel
        assert _sha256(other / rel) != _sha256(tiny_model_dir / rel), rel
    assert _sha256(again / "tokenizer/tokenizer.json") == _sha256(tiny_model_dir / "tokenizer/tokenizer.json")


def test_preset_json_records_parameter_counts(tiny_model_dir: Path) -> None:
    from diffusers import QwenImageEditPlusPipeline

    record = json.loads((tiny_model_dir / PRESET_FILE).read_text())
    assert (record["name"], record["seed"], record["version"]) == ("tiny", 0, PRESET_FORMAT_VERSION)
    assert record["parameters"] == preset_parameter_counts(tiny_model_dir)

    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_model_dir)
    for component, count in record["parameters"].items():
        model = getattr(pipe, component)
        assert count == sum(p.numel() for p in model.parameters()), component


def test_rebuild_is_skipped_and_foreign_folders_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    stamp = (tiny_model_dir / PRESET_FILE).stat().st_mtime_ns
    assert build_preset("tiny", tiny_model_dir, seed=0) == tiny_model_dir
    assert (tiny_model_dir / PRESET_FILE).stat().st_mtime_ns == stamp

    with pytest.raises(InputError, match="empty"):
        build_preset("tiny", tiny_model_dir, seed=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="empty"):
        build_preset("tiny", tmp_path / "busy")
    with pytest.raises(InputError, match="Unknown preset"):
        build_preset("huge", tmp_path / "huge")

    (tmp_path / "empty").mkdir()
    assert (build_preset("tiny", tmp_path / "empty") / "model_index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], (
        "temporary build folder left behind"
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_specs_are_consistent(name: str) -> None:
    spec = PRESETS[name]
    spec.validate()
    t = spec.transformer
    assert sum(t.axes_dims_rope) == t.attention_head_dim


def test_invalid_spec_is_rejected() -> None:
    from dataclasses import replace

    tiny = PRESETS["tiny"]
    bad: PresetSpec = replace(tiny, transformer=replace(tiny.transformer, axes_dims_rope=(4, 4, 4)))
    with pytest.raises(InputError, match="axes_dims_rope"):
        bad.validate()


@pytest.mark.slow
def test_small_preset_size(small_model_dir: Path) -> None:
    """``small``: ~257M-parameter DiT, ~1 GB fp32 on disk; building it takes ~10-15 s on a 16-core CPU."""
    counts = preset_parameter_counts(small_model_dir)
    lo, hi = SMALL_TRANSFORMER_PARAMS
    assert lo <= counts["transformer"] <= hi, counts
    config = json.loads((small_model_dir / "transformer/config.json").read_text())
    assert config["num_attention_heads"] * config["attention_head_dim"] >= 768
    assert config["joint_attention_dim"] == PRESETS["small"].text_encoder.hidden_size
