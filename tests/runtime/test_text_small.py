"""The compiled prompt encoder on the ``small`` preset: the two text graphs exported alone (fp32, the exporter's own
jobs), run in ONNX Runtime behind ``CompiledPromptEncoder``, against transformers' fp32 forward within 1e-4 of
scale, for 0-3 references and both position modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from uniref_deploy.export.graph_export import DEFAULT_OPSET  # noqa: E402
from uniref_deploy.export.text_export import load_text, text_jobs  # noqa: E402
from uniref_deploy.export.text_files import write_text_files  # noqa: E402
from uniref_deploy.runtime.pipeline_classes import EDIT_PLUS, PIPELINE_CLASSES  # noqa: E402
from uniref_deploy.runtime.text import condition_images  # noqa: E402
from uniref_deploy.runtime.text_host import TextHost  # noqa: E402
from uniref_deploy.runtime.text_onnx import CompiledPromptEncoder  # noqa: E402

pytestmark = pytest.mark.slow  # builds and exports the small preset's text encoder

PLUS = PIPELINE_CLASSES[EDIT_PLUS]


def export_text_graphs(model_dir: Path, out: Path) -> tuple[Path, dict[str, Path], object]:
    """``out/text/`` and ``out/<graph>.onnx`` (fp32) through the exporter's jobs; returns the loaded references."""
    refs = load_text(model_dir)
    graphs = {}
    for job in text_jobs(refs, "fp32", DEFAULT_OPSET, validate=False):
        graphs[job["name"]] = out / f"{job['name']}.onnx"
        job["write"](graphs[job["name"]])
    table = refs.model.model.language_model.embed_tokens.weight.detach()
    write_text_files(model_dir, out, lambda a, b: table[a:b].float().numpy(), tuple(table.shape), fp16=False)
    return out / "text", graphs, refs


def session_runner(path: Path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(None, dict(feeds)), strict=True))


@pytest.fixture(scope="module")
def small_text(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    text_dir, graphs, refs = export_text_graphs(small_model_dir, tmp_path_factory.mktemp("small-text"))
    return text_dir, graphs, refs.model, transformers.AutoProcessor.from_pretrained(small_model_dir / "processor")


@pytest.mark.parametrize("count", [0, 1, 3])
def test_small_embeds_match_transformers(small_text, count):
    text_dir, graphs, model, processor = small_text
    rng = np.random.default_rng(count)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              ((300, 500), (640, 90), (256, 256))[:count]]
    prompt = "把左边的人放到右边的房间里 🏠✨ keep the lighting"
    cond = condition_images(images)
    inputs = processor(text=[PLUS.format_prompt(prompt, count)], images=cond or None, return_tensors="pt")
    for mode, token_types in (("mrope", True), ("sequential", False)):
        enc = CompiledPromptEncoder(TextHost.from_dir(text_dir, mode), np.load(text_dir / "embed_tokens.npy",
                                    mmap_mode="r"), session_runner(graphs["text_vision"]),
                                    session_runner(graphs["text_encoder"]))
        got = enc.encode(prompt, images)[0]
        kwargs = dict(inputs) if token_types else {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        with torch.no_grad():
            want = model(**kwargs, output_hidden_states=True).hidden_states[-1][0, PLUS.drop_tokens:].numpy()[None]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), mode
