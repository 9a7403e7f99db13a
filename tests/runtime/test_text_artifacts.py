"""The compiled prompt encoder end to end on ``compile tiny`` artifacts (the two exported text graphs on ONNX
Runtime): an edit matches diffusers' ``QwenImageEditPlusPipeline`` to 2/255 with 1-3 references and CFG, the CLI
edit loads no torch/transformers/diffusers/onnx, and bad prompts/references fail in one line with exit 2.

Positions: "mrope" (3-D, as Qwen2.5-VL was trained) is compared with diffusers whose text encoder gets the
processor's ``mm_token_type_ids`` (the change of diffusers PR #14189: without them transformers 5.x falls back to
sequential positions, diffusers issue #14194); "sequential" is compared with diffusers as released. Sizes are
shrunk as in ``test_pipeline_parity.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from diffusers import QwenImageEditPlusPipeline  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus  # noqa: E402

from uniref_deploy.runtime.manifest import Manifest  # noqa: E402
from uniref_deploy.runtime.pipeline import Pipeline  # noqa: E402
from uniref_deploy.runtime.text_onnx import CompiledPromptEncoder  # noqa: E402

pytestmark = pytest.mark.slow  # compiles the tiny preset (session fixture) and runs diffusers

VAE_AREA, COND_AREA = 64 * 64, 56 * 56
WIDTH, HEIGHT, STEPS, CFG = 64, 48, 2, 4.0
PROMPT, NEGATIVE = "把图1的猫放进图2的房间 🐱", "blurry"
TOLERANCE = 2.0 / 255.0
HEAVY = ("torch", "transformers", "diffusers", "onnx")


@pytest.fixture(scope="module")
def text_art(tiny_artifacts: Path) -> Path:
    manifest = Manifest.load(tiny_artifacts)
    if getattr(manifest, "text", None) is None:
        pytest.fail("compile tiny wrote no text graphs (manifest.text is missing)")
    return tiny_artifacts


@pytest.fixture(scope="module")
def references() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((80, 120), (100, 60),
                                                                                           (90, 90))]


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_model_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(edit_plus, "VAE_IMAGE_SIZE", VAE_AREA)
        mp.setattr(edit_plus, "CONDITION_IMAGE_SIZE", COND_AREA)
        pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_model_dir)
        pipe.set_progress_bar_config(disable=True)
        yield pipe


def _forward_token_types(text_encoder):
    """Give the text encoder the processor's mm_token_type_ids (image tokens = 1), as diffusers PR #14189 does."""
    original = text_encoder.forward

    def forward(*args, input_ids=None, **kwargs):
        if input_ids is not None:
            kwargs.setdefault("mm_token_type_ids", (input_ids == text_encoder.config.image_token_id).long())
        return original(*args, input_ids=input_ids, **kwargs)

    return forward


def _diffusers(pipe, refs, latents, three_d: bool) -> np.ndarray:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(edit_plus, "VAE_IMAGE_SIZE", VAE_AREA)
        mp.setattr(edit_plus, "CONDITION_IMAGE_SIZE", COND_AREA)
        if three_d:
            mp.setattr(pipe.text_encoder, "forward", _forward_token_types(pipe.text_encoder))
        out = pipe(image=refs, prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=CFG, num_inference_steps=STEPS,
                   width=WIDTH, height=HEIGHT, latents=torch.from_numpy(latents.copy()), output_type="np")
    return np.asarray(out.images[0], dtype=np.float32)


@pytest.mark.parametrize("mode", ["mrope", "sequential"])
@pytest.mark.parametrize("num_refs", [1, 2, 3])
def test_ort_edit_matches_diffusers(text_art, diffusers_pipe, references, num_refs, mode):
    ours = Pipeline.from_artifacts(text_art, backend="ort", condition_image_area=COND_AREA, text_positions=mode)
    try:
        assert isinstance(ours.text_encoder, CompiledPromptEncoder)
        z = ours.config.latent_channels
        latents = np.random.default_rng(7).standard_normal((1, (HEIGHT // 16) * (WIDTH // 16), 4 * z),
                                                           dtype=np.float32)
        got = ours(PROMPT, image=references[:num_refs], negative_prompt=NEGATIVE, true_cfg_scale=CFG,
                   num_inference_steps=STEPS, budget=VAE_AREA, policy="per-image", width=WIDTH, height=HEIGHT,
                   latents=latents.copy(), output_type="np")
    finally:
        ours.close()
    want = _diffusers(diffusers_pipe, references[:num_refs], latents, three_d=mode == "mrope")
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOLERANCE


@pytest.mark.parametrize("num_refs", [1, 3])
def test_prompt_embeds_match_diffusers(text_art, diffusers_pipe, references, num_refs):
    """The exported encoder's embeddings vs diffusers' own ``_get_qwen_prompt_embeds`` (fp32) within 1e-4 of
    scale, per position mode; the two modes differ by far more (so the check tells them apart)."""
    results = {}
    for mode in ("mrope", "sequential"):
        ours = Pipeline.from_artifacts(text_art, backend="ort", condition_image_area=COND_AREA, text_positions=mode)
        cond = ours.text_encoder.condition(references[:num_refs])
        got = ours.text_encoder.encode(PROMPT, references[:num_refs])[0]
        ours.close()
        with pytest.MonkeyPatch.context() as mp:
            if mode == "mrope":
                mp.setattr(diffusers_pipe.text_encoder, "forward", _forward_token_types(diffusers_pipe.text_encoder))
            with torch.no_grad():
                want = diffusers_pipe._get_qwen_prompt_embeds(PROMPT, cond, torch.device("cpu"), torch.float32)[0]
        want = want.numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), mode
        results[mode] = got
    assert np.abs(results["mrope"] - results["sequential"]).max() > 3e-4 * np.abs(results["mrope"]).max()


PROBE = """
import json, sys
from uniref_deploy.tools.cli import main
code = main(sys.argv[1:])
heavy = json.loads('{heavy}')
print(json.dumps({{"code": code, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in heavy)}}))
"""


def _cli(args: list[str]) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=json.dumps(HEAVY)), *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_cli_edit_is_torch_free(text_art, references, tmp_path):
    paths = []
    for i, ref in enumerate(references[:2]):
        paths += ["--image", str(tmp_path / f"r{i}.png")]
        ref.save(tmp_path / f"r{i}.png")
    out, err = _cli(["edit", str(text_art), "--backend", "ort", "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                     *paths, "--steps", "2", "--budget", "512", "-o", str(tmp_path / "out.png")])
    assert out["code"] == 0, err
    assert out["heavy"] == [], f"the edit loaded {out['heavy']}"
    assert Image.open(tmp_path / "out.png").size[0] > 0


@pytest.mark.parametrize(("extra", "message"), [
    (["--prompt", "word " * 1100], "over the limit of 1024"),
    (["--prompt", "p", "--image", "{wide}"], "aspect over 200:1"),
])
def test_cli_bad_input_one_line_exit_2(text_art, tmp_path, extra, message):
    Image.new("RGB", (6000, 16)).save(tmp_path / "wide.png")
    args = [a.replace("{wide}", str(tmp_path / "wide.png")) for a in extra]
    out, err = _cli(["edit", str(text_art), "--backend", "ort", *args, "--steps", "1", "--budget", "512",
                     "--width", "256", "--height", "256", "-o", str(tmp_path / "o.png")])
    assert out["code"] == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()


def test_more_references_than_the_vision_profile(text_art, references):
    pipe = Pipeline.from_artifacts(text_art, backend="ort")
    limit = pipe.text_encoder.vision_max_patches
    pipe.text_encoder.vision_max_patches = 1  # the check reads the manifest's limit; shrink it to reach it cheaply
    with pytest.raises(Exception, match="vision patches, over the 1 ") as err:
        pipe("p", image=references[:1], num_inference_steps=1, budget=256 * 256)
    assert type(err.value).__name__ == "InputError" and limit >= 1


def test_damaged_text_file_refused_at_load(text_art, copy_artifacts):
    from uniref_deploy.runtime.errors import ManifestError

    art = copy_artifacts()
    (art / "text" / "tokenizer.json").write_text("{}")
    with pytest.raises(ManifestError, match="tokenizer.json"):
        Pipeline.from_artifacts(art, backend="ort")


def test_openvino_runs_the_text_graphs_like_ort(text_art, references):
    pytest.importorskip("openvino")
    from uniref_deploy.runtime.text_runners import text_graph_runners

    manifest = Manifest.load(text_art)
    embeds = {}
    for backend in ("ort", "openvino"):
        encoder = CompiledPromptEncoder.from_artifacts(text_art, manifest, text_graph_runners(text_art, manifest, backend))
        embeds[backend], _ = encoder.encode(PROMPT, references[:2])
    want = embeds["ort"]
    assert embeds["openvino"].shape == want.shape
    assert np.abs(embeds["openvino"] - want).max() <= 1e-4 * np.abs(want).max()


BLOCKED_PROBE = """
import json, sys
for name in ("onnxruntime", "torch", "transformers", "diffusers", "onnx"):
    sys.modules[name] = None  # as in a `pip install '.[openvino]'` venv: importing any of them fails
from uniref_deploy.tools.cli import main
print(json.dumps({"code": main(sys.argv[1:])}))
"""


def test_openvino_only_install_edits(text_art, references, tmp_path):
    pytest.importorskip("openvino")
    references[0].save(tmp_path / "r0.png")
    proc = subprocess.run([sys.executable, "-c", BLOCKED_PROBE, "edit", str(text_art), "--backend", "openvino",
                           "--prompt", PROMPT, "--image", str(tmp_path / "r0.png"), "--steps", "2", "--budget", "512",
                           "-o", str(tmp_path / "out.png")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and json.loads(proc.stdout.strip().splitlines()[-1])["code"] == 0, proc.stderr
    assert Image.open(tmp_path / "out.png").size[0] > 0
