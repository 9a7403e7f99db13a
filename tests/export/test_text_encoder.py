"""The prompt-encoder graphs (export/text_encoder.py) against transformers' Qwen2.5-VL, and their host files.

Host inputs come from transformers' own helpers (``get_vision_window_index``, ``get_rope_index``, the rotary
modules) through export/text_samples.py; the reference is transformers' forward in fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from uniref_deploy.export.text_encoder import load_text_encoder, text_modules  # noqa: E402
from uniref_deploy.export.text_samples import (  # noqa: E402
    causal_mask,
    mrope_positions,
    rope_tables,
    vision_feeds,
    vision_host_inputs,
)
from uniref_deploy.runtime.encoder_io import (  # noqa: E402
    EMBED_TABLE,
    TEXT_ENCODER,
    TEXT_VISION,
    most_patches_at_area,
    text_graph_io,
)

TOL = 1e-4
VISION_INPUTS = ("pixel_patches", "window_index", "vision_cos", "vision_sin", "window_mask", "full_mask")


def _model(depth: int = 3, heads: int = 4, kv_heads: int = 2, seed: int = 0):
    """A small random Qwen2.5-VL with window blocks (fullatt at block 1 only) and grouped-query attention."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                     "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
        vision_config={"depth": depth, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                       "out_hidden_size": 64, "fullatt_block_indexes": [1], "window_size": 112},
        image_token_id=90, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).float().eval()


def _scale_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("grids", [((1, 12, 20),), ((1, 4, 4), (1, 18, 10), (1, 2, 30))])
def test_vision_wrapper_matches_transformers(grids):
    """Window blocks (several windows per image) and the full block: equal to get_image_features."""
    model = _model()
    vision, _ = text_modules(model)
    feeds = vision_feeds(model.model.visual, grids, seed=1)
    windows = np.unique(feeds["window_mask"][0, 0], axis=0).shape[0]
    assert windows > len(grids)  # the grids span several attention windows: the window mask matters
    with torch.no_grad():
        ours = vision(*[torch.from_numpy(feeds[k]) for k in VISION_INPUTS])
        ref = torch.cat(model.model.get_image_features(torch.from_numpy(feeds["pixel_patches"]),
                                                       torch.tensor(grids)).pooler_output)
    assert ours.shape == ref.shape
    assert _scale_err(ours, ref) <= TOL


def test_vision_window_mask_is_not_the_full_mask():
    """Feeding the full mask to the window blocks changes the output: the graph really uses both masks."""
    model = _model()
    vision, _ = text_modules(model)
    host = vision_host_inputs(model.model.visual, ((1, 12, 20),))
    pixels = torch.randn(240, 1176)
    with torch.no_grad():
        good = vision(pixels, host["window_index"], host["vision_cos"], host["vision_sin"], host["window_mask"],
                      host["full_mask"])
        wrong = vision(pixels, host["window_index"], host["vision_cos"], host["vision_sin"], host["full_mask"],
                       host["full_mask"])
    assert _scale_err(wrong, good) > 1e-3


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (4, 4)])
def test_language_wrapper_matches_transformers(heads, kv_heads):
    """hidden_states[-1] of the full model (images scattered in, M-RoPE from get_rope_index) equals the wrapper."""
    model = _model(heads=heads, kv_heads=kv_heads)
    _, encoder = text_modules(model)
    grids = ((1, 4, 6), (1, 8, 4))
    cfg = model.config
    ids = [1, 2, 3]
    for t, h, w in grids:
        ids += [cfg.vision_start_token_id, *[cfg.image_token_id] * (t * h * w // 4), cfg.vision_end_token_id, 7]
    input_ids = torch.tensor([ids + [8, 9, 10]])
    positions = mrope_positions(model, input_ids, grids)
    captured = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda _m, _a, kw: captured.update(kw),
                                                                with_kwargs=True)
    pixels = torch.from_numpy(vision_feeds(model.model.visual, grids, seed=2)["pixel_patches"])
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, pixel_values=pixels, image_grid_thw=torch.tensor(grids),
                        position_ids=positions, output_hidden_states=True)
    finally:
        hook.remove()
    cos, sin = rope_tables(model, positions)
    with torch.no_grad():
        ours = encoder(captured["inputs_embeds"], cos, sin, causal_mask(input_ids.shape[1]))
    assert _scale_err(ours, out.hidden_states[-1]) <= TOL


def test_fp16_wrapper_keeps_norms_in_float32():
    from uniref_deploy.export.precision import Float32Island
    from uniref_deploy.export.text_export import TextReferences, at_precision

    model = _model()
    vision, encoder = text_modules(model)
    config = json.loads(model.config.to_json_string())
    refs = TextReferences(model, {TEXT_VISION: vision, TEXT_ENCODER: encoder}, config)
    refs.smoke = {TEXT_VISION: [("a", vision_feeds(model.model.visual, ((1, 4, 4),), 0))], TEXT_ENCODER: []}
    refs.full = {TEXT_VISION: [], TEXT_ENCODER: []}
    fp16, keep = at_precision(refs, TEXT_VISION, "fp16")
    assert "merger.ln_q" in keep and "blocks.0.norm1" in keep
    assert isinstance(fp16.inner.merger.ln_q, Float32Island)
    assert fp16.inner.blocks[0].attn.qkv.weight.dtype == torch.float16


# --- limits ---------------------------------------------------------------------------------------------------


def test_most_patches_bounds_transformers_smart_resize():
    """No condition image (diffusers' 384² resize, then the processor's smart_resize) has more patches than the
    bound, and the bound is reached by some aspect."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    processor = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14, "merge_size": 2}
    area = 384 * 384
    bound = most_patches_at_area(area, processor)
    rng = np.random.default_rng(0)
    seen = 0
    for ratio in np.exp(rng.uniform(-math.log(200), math.log(200), 3000)):
        w, h = calculate_dimensions(area, float(ratio))
        try:
            rh, rw = smart_resize(max(h, 32), max(w, 32), factor=28, min_pixels=processor["min_pixels"],
                                  max_pixels=processor["max_pixels"])
        except ValueError:  # the processor refuses the aspect: the runtime rejects such a reference
            continue
        seen = max(seen, (rh // 14) * (rw // 14))
    assert 0 < seen <= bound
    assert seen >= 0.9 * bound  # random aspects come close to the extreme the bound is taken at


# --- ART/text files ---------------------------------------------------------------------------------------------


def test_tokenizer_built_from_vocab_and_merges_matches_transformers(tiny_model_dir: Path, tmp_path: Path):
    """A folder with only vocab.json + merges.txt + tokenizer_config.json yields a tokenizer.json whose ids equal
    transformers' tokenizer on specials, Chinese and emoji."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from uniref_deploy.export.text_files import write_tokenizer

    original = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    folder = tmp_path / "tok"
    original.save_pretrained(folder)
    (folder / "tokenizer.json").unlink()
    backend = json.loads(original.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(backend["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {  # as the published Qwen2 tokenizer_config.json holds them
        str(i): {"content": t.content, "special": t.special, "normalized": t.normalized, "lstrip": t.lstrip,
                 "rstrip": t.rstrip, "single_word": t.single_word} for i, t in original.added_tokens_decoder.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer(folder, out)
    built = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in ("<|im_start|>user\nmake the sky purple<|im_end|>", "把天空变成紫色 🌅🎨", "Picture 1: "
                 "<|vision_start|><|image_pad|><|vision_end|>x  y\n\n"):
        assert built.encode(text, add_special_tokens=False).ids == original(text)["input_ids"]


@pytest.mark.slow
def test_compiled_tiny_has_text_graphs_matching_transformers(tiny_artifacts: Path):
    """compile tiny: both text graphs (fp32, fp16) with ART/text/ hashed; ONNX Runtime fp32 equals transformers."""
    import onnxruntime as ort

    from uniref_deploy.runtime.manifest import Manifest

    manifest = Manifest.load(tiny_artifacts)
    for name in (TEXT_VISION, TEXT_ENCODER):
        for precision in ("fp32", "fp16"):
            g = manifest.graph(name, precision)
            assert g.validated and g.info["trt_lint_passed"], g.key
    assert manifest.text and f"text/{EMBED_TABLE}" in manifest.text["files"]
    assert {"text/tokenizer.json", "text/config.json"} <= set(manifest.text["files"])
    manifest.verify_files(tiny_artifacts)

    model = load_text_encoder(Path(manifest.model.text_encoder_dir) / "text_encoder")
    table = np.load(tiny_artifacts / "text" / EMBED_TABLE, mmap_mode="r")
    assert np.array_equal(table, model.model.language_model.embed_tokens.weight.detach().numpy())
    grids = ((1, 6, 10), (1, 4, 4))
    feeds = vision_feeds(model.model.visual, grids, seed=5)
    session = ort.InferenceSession(str(tiny_artifacts / manifest.graph(TEXT_VISION).file))
    got = session.run(None, {k: feeds[k] for k in VISION_INPUTS})[0]
    with torch.no_grad():
        ref = torch.cat(model.model.get_image_features(torch.from_numpy(feeds["pixel_patches"]),
                                                       torch.tensor(grids)).pooler_output).numpy()
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()

    cfg = model.config
    merged = 6 * 10 // 4  # the first image's tokens
    text = 40  # an ordinary token (the tiny vocabulary's specials sit below 10)
    input_ids = torch.tensor([[text, text + 1, cfg.vision_start_token_id, *[cfg.image_token_id] * merged,
                               cfg.vision_end_token_id, *[text + 2] * 30]])
    positions = mrope_positions(model, input_ids, grids[:1])
    embeds = table[input_ids[0].numpy()].copy()[None]
    embeds[0, input_ids[0].numpy() == cfg.image_token_id] = got[:merged]
    cos, sin = rope_tables(model, positions)
    session = ort.InferenceSession(str(tiny_artifacts / manifest.graph(TEXT_ENCODER).file))
    names = [s.name for s in text_graph_io(TEXT_ENCODER, manifest_text_config(tiny_artifacts))[0]]
    out = session.run(None, dict(zip(names, (embeds, cos.numpy(), sin.numpy(),
                                             causal_mask(input_ids.shape[1]).numpy()), strict=True)))[0]
    with torch.no_grad():
        ref = model(input_ids=input_ids, pixel_values=torch.from_numpy(feeds["pixel_patches"][:60]),
                    image_grid_thw=torch.tensor(grids[:1]), position_ids=positions,
                    output_hidden_states=True).hidden_states[-1].numpy()
    assert np.abs(out - ref).max() <= TOL * np.abs(ref).max()


def manifest_text_config(art: Path) -> dict:
    return json.loads((art / "text" / "config.json").read_text())


@pytest.mark.slow
def test_lean_text_export_equals_regular_export(tiny_artifacts: Path, tmp_path: Path):
    """The streamed export (meta trace + safetensors bytes) gives the same outputs as the regular one."""
    import onnxruntime as ort

    from uniref_deploy.export.lean_text import export_text_lean
    from uniref_deploy.runtime.manifest import Manifest

    manifest = Manifest.load(tiny_artifacts)
    model_dir = Path(manifest.model.text_encoder_dir)
    stats = export_text_lean(model_dir, tmp_path / "onnx", tmp_path / "text", dtype="fp16")
    assert stats["peak_rss_bytes"] > 0
    model = load_text_encoder(model_dir / "text_encoder")
    feeds = vision_feeds(model.model.visual, ((1, 4, 8),), seed=3)
    for rel in (f"{TEXT_VISION}.fp16.onnx",):
        lean = ort.InferenceSession(str(tmp_path / "onnx" / rel)).run(None, feeds)[0]
        regular = ort.InferenceSession(str(tiny_artifacts / "onnx" / rel)).run(None, feeds)[0]
        assert np.array_equal(lean, regular)
    assert np.array_equal(np.load(tmp_path / "text" / EMBED_TABLE), np.load(tiny_artifacts / "text" / EMBED_TABLE))
