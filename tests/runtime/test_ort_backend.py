"""The ONNX Runtime backend against the torch backend: the same edit at every budget, 1-3 references.

The tiny artifacts are exported with the 1024 bucket recorded; the graphs themselves have dynamic axes and no
budget baked in, so a private copy records all three buckets to let the pipeline accept 1536/2048 requests.
Targets are 256x256 so ONNX Runtime's CPU attention (which materialises S x S scores) fits this machine; the
references still fill each bucket's budget (8192 / 18432 / 32768 image tokens with the target).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from uniref_deploy.runtime.budget import Budget  # noqa: E402
from uniref_deploy.runtime.errors import InputError  # noqa: E402
from uniref_deploy.runtime.manifest import Manifest  # noqa: E402
from uniref_deploy.runtime.pipeline import Pipeline  # noqa: E402

pytestmark = pytest.mark.slow  # the tiny_artifacts session fixture compiles a model (minutes on 2 cores)

TOLERANCE = 2.0 / 255.0
REFERENCES = [(120, 80), (60, 100), (200, 50)]


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    w, h = size
    rng = np.random.default_rng(seed)
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    return Image.fromarray(np.clip(grad + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pipelines(tiny_artifacts: Path, tmp_path_factory):
    import shutil

    art = tmp_path_factory.mktemp("ort") / "art"
    shutil.copytree(tiny_artifacts, art)
    manifest = Manifest.load(art)
    manifest.with_budgets((1024**2, 1536**2, 2048**2)).save(art)
    return Pipeline.from_artifacts(art, backend="ort"), Pipeline.from_pretrained(art / "source")


# Every reference count at 1024 (with CFG); one case per larger bucket: an ORT call at 2048 holds ~10 GB of
# attention scores and takes ~15 s on 2 cores, and the reference count does not change the token count there.
CASES = [(1024, 1), (1024, 2), (1024, 3), (1536, 2), (2048, 3)]


@pytest.mark.parametrize(("budget", "num_refs"), CASES)
def test_ort_reproduces_torch(pipelines, budget: int, num_refs: int) -> None:
    ort_pipe, torch_pipe = pipelines
    refs = [_image(s, i) for i, s in enumerate(REFERENCES[:num_refs])]
    cfg = budget == 1024  # CFG doubles the DiT calls: exercised where the sequence is shortest
    kw = dict(image=refs, budget=budget * budget, width=256, height=256, seed=budget + num_refs,
              num_inference_steps=2 if cfg else 1, negative_prompt="blurry" if cfg else None, output_type="np")
    a = ort_pipe("turn it into a watercolor", **kw)
    b = torch_pipe("turn it into a watercolor", **kw)
    layout = ort_pipe.last_layout
    assert layout.reference_area <= budget * budget
    assert a.shape == b.shape == (256, 256, 3)
    diff = float(np.abs(a - b).max())
    assert diff <= TOLERANCE, f"budget {budget}, {num_refs} refs ({layout.num_image_tokens} tokens): {diff:.3g}"
    assert float(a.std()) > 1e-3


def test_budget_over_the_largest_compiled_is_refused(tiny_artifacts: Path) -> None:
    pipe = Pipeline.from_artifacts(tiny_artifacts, backend="ort", load_text_encoder=False)
    with pytest.raises(InputError, match="largest budget compiled"):
        pipe(prompt_embeds=np.zeros((1, 4, 32), np.float32), width=64, height=64, budget=2048 * 2048)


@pytest.mark.parametrize("budget", ["512", "640x480"])
def test_smaller_budgets_run_on_ort_and_match_torch(tiny_artifacts: Path, budget: str) -> None:
    """ONNX Runtime graphs are dynamic: a budget below the compiled 1024² (square or not) runs, as torch does."""
    bounds = Budget.parse(budget)
    ort_pipe = Pipeline.from_artifacts(tiny_artifacts, backend="ort")
    torch_pipe = Pipeline.from_pretrained(tiny_artifacts / "source")
    refs = [_image(s, i) for i, s in enumerate(REFERENCES[:2])]
    kw = dict(image=refs, budget=bounds, seed=7, num_inference_steps=1, output_type="np")
    a = ort_pipe("turn it into a watercolor", **kw)
    b = torch_pipe("turn it into a watercolor", **kw)
    layout = ort_pipe.last_layout
    assert layout.budget == bounds and layout.reference_area <= bounds.pixels
    assert layout.target.width * layout.target.height <= bounds.pixels
    assert a.shape == b.shape and float(np.abs(a - b).max()) <= TOLERANCE


def test_feeds_are_validated_against_the_graph(tiny_artifacts: Path) -> None:
    pipe = Pipeline.from_artifacts(tiny_artifacts, backend="ort", load_text_encoder=False)
    with pytest.raises(InputError, match="hidden_states"):
        pipe.backends["vae_decoder"].infer({"hidden_states": np.zeros((1, 4, 8, 8), np.float32)})
    with pytest.raises(InputError, match="float32"):
        pipe.backends["vae_decoder"].infer({"latent": np.zeros((1, 4, 8, 8), np.float64)})
