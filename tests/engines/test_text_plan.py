"""The prompt-encoder engines in the build plan and the memory plan (engines/plan.py, ranges.py, memory.py).

The text record's limits are computed from the real Qwen-Image-Edit processor config and the pipeline classes
(runtime/encoder_io.py); the plan must cover every prompt the runtime accepts at each bucket.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from uniref_deploy.engines.memory import activation_bytes, text_activation_bytes
from uniref_deploy.engines.plan import make_plan
from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.encoder_io import (
    MERGED,
    PATCHES,
    TEXT_ENCODER,
    TEXT_GRAPHS,
    TEXT_LEN,
    TEXT_VISION,
    EncoderDims,
    max_text_len,
    most_patches_at_area,
    text_graph_io,
    vision_max_patches,
)
from uniref_deploy.runtime.graphs import DIT, VAE_DECODER, VAE_ENCODER, graph_io
from uniref_deploy.runtime.manifest import GraphSpec, Manifest, ModelConfig
from uniref_deploy.runtime.packing import max_references
from uniref_deploy.runtime.pipeline_classes import EDIT, EDIT_PLUS, PIPELINE_CLASSES

REAL = json.loads((Path(__file__).parents[2] / "presets" / "real_configs" / "qwen-image-edit.json").read_text())
SIDES = (1024, 1536, 2048)


def _config() -> ModelConfig:
    transformer = {"in_channels": 64, "out_channels": 16, "patch_size": 2, "axes_dims_rope": [16, 56, 56],
                   "joint_attention_dim": 3584}
    vae = {"z_dim": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16,
           "temperal_downsample": [False, True, True]}
    return ModelConfig("qwen-image", transformer, vae, {})


def _spec(name: str, precision: str, io) -> GraphSpec:
    sha = hashlib.sha256(f"{name}.{precision}".encode()).hexdigest()
    return GraphSpec(name, precision, f"onnx/{name}.{precision}.onnx", sha, *io)


def _text_record(pipeline: str) -> dict:
    cls, processor = PIPELINE_CLASSES[pipeline], REAL["processor"]
    per = {str(Budget.from_side(s).pixels): vision_max_patches(cls, Budget.from_side(s), processor) for s in SIDES}
    return {"dir": "text", "files": {}, "vision_max_patches": max(per.values()), "max_text_len": max_text_len(cls),
            "vision_patches": per, "vision_opt_patches": 900, "opt_text_len": 320, "merge_unit": 4}


def _manifest(pipeline: str = EDIT_PLUS, text_precisions=("fp32", "fp16")) -> Manifest:
    config = _config()
    graphs = [_spec(n, p, graph_io(n, config)) for n in (DIT, VAE_ENCODER, VAE_DECODER) for p in ("fp32", "fp16")]
    graphs += [_spec(n, p, text_graph_io(n, REAL["text_encoder"])) for n in TEXT_GRAPHS for p in text_precisions]
    return Manifest(config, tuple(Budget.from_side(s) for s in SIDES), tuple(graphs), text=_text_record(pipeline))


@pytest.mark.parametrize("pipeline", [EDIT_PLUS, EDIT])
def test_text_engines_cover_every_accepted_prompt_per_bucket(pipeline):
    manifest = _manifest(pipeline)
    plan = make_plan(manifest, SIDES)
    by_graph = {e.graph: e for e in plan.engines}
    assert {TEXT_VISION, TEXT_ENCODER} <= set(by_graph)
    cls = PIPELINE_CLASSES[pipeline]
    for i, side in enumerate(SIDES):
        budget = Budget.from_side(side)
        one = most_patches_at_area(cls.condition_area or budget.pixels, REAL["processor"])
        vision = by_graph[TEXT_VISION].profiles[i]
        assert vision.budget == budget
        refs = max_references(budget) if cls.max_references is None else cls.max_references
        # the largest accepted request: as many references as fit the conditioning limit, each at its largest
        accepted = min(refs, (4 * cls.max_text_tokens) // one) * one if cls.condition_area else one
        assert vision.axis(PATCHES).max >= min(accepted, 4 * cls.max_text_tokens)
        assert vision.axis(PATCHES).max <= 4 * cls.max_text_tokens  # no more than the text limit can hold
        assert vision.axis(MERGED).max * 4 == vision.axis(PATCHES).max
        assert vision["window_mask"].max == (1, 1, vision.axis(PATCHES).max, vision.axis(PATCHES).max)
        encoder = by_graph[TEXT_ENCODER].profiles[i]
        assert encoder.axis(TEXT_LEN).max == cls.drop_tokens + cls.max_text_tokens
        assert encoder["inputs_embeds"].max == (1, cls.drop_tokens + cls.max_text_tokens, 3584)


def test_text_engines_prefer_fp16_and_never_fp8():
    plan = make_plan(_manifest(), SIDES, precisions=("fp16", "fp8"))
    text = [e for e in plan.engines if e.graph in TEXT_GRAPHS]
    assert [(e.graph, e.precision) for e in text] == [(TEXT_VISION, "fp16"), (TEXT_ENCODER, "fp16")]
    only32 = make_plan(_manifest(text_precisions=("fp32",)), SIDES)
    assert {e.precision for e in only32.engines if e.graph in TEXT_GRAPHS} == {"fp32"}


def test_artifacts_without_text_plan_no_text_engines():
    manifest = _manifest()
    plain = Manifest(manifest.model, manifest.budgets, manifest.graphs)
    assert not [e for e in make_plan(plain, SIDES).engines if e.graph in TEXT_GRAPHS]


def test_text_activations_grow_quadratically_and_halve_from_fp32():
    dims = EncoderDims.from_config(REAL["text_encoder"])
    model = _config()
    small, large = (text_activation_bytes(TEXT_VISION, {PATCHES: n}, dims, 2) for n in (1000, 4000))
    assert 4 < large / small <= 16  # the N x N score and mask terms dominate at 4000 patches
    fp32 = activation_bytes(TEXT_ENCODER, {TEXT_LEN: 1088}, model, None, "fp32", dims)
    fp16 = activation_bytes(TEXT_ENCODER, {TEXT_LEN: 1088}, model, None, "fp16", dims)
    assert fp16 < fp32 < 2 * fp16 + 1  # the float32 scores do not shrink with the graph precision
