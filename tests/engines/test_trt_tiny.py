"""Edits through the TensorRT backend and builder on the tiny artifacts, run by the TensorRT stand-in.

The stand-in (tests/fakes) executes each plan's ONNX graph with ONNX Runtime, so these results are ONNX Runtime
results through this project's TensorRT code (builder, profiles, shared memory, CUDA graphs), never TensorRT
results. The engines are built with the real planning rules at two small pixel budgets (448² and 640², the
smallest that hold three references), so a CPU run stays cheap while requests land in either profile; the
full-size ranges are tested in ``test_plan.py``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from uniref_deploy.engines.plan import VAE_ENGINE_PREFERENCE
from uniref_deploy.engines.ranges import axis_ranges, make_profile
from uniref_deploy.engines.records import BuildPlan, EnginePlan, PlanOptions
from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.manifest import Manifest

pytestmark = pytest.mark.slow

SMALL = (Budget.from_side(448), Budget.from_side(640))
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-3}  # same ONNX graph under both: only thread-order rounding differs


def _engine(manifest: Manifest, name: str, precision: str) -> EnginePlan:
    graph = manifest.graph(name, precision)
    scale = manifest.model.vae_scale_factor
    profiles = tuple(make_profile(graph, b, axis_ranges(name, b, PlanOptions(), scale)) for b in SMALL)
    return EnginePlan(name, precision, graph.file, graph.sha256, f"engines/{name}.{precision}.plan", profiles,
                      builder_optimization_level=1)


@pytest.fixture(scope="module")
def engines(fake_trt_module, tiny_artifacts, tmp_path_factory):
    """A copy of the tiny artifacts with DiT and VAE engines at 128² and 192² (two profiles each)."""
    from uniref_deploy.engines.build import build_engines

    art = tmp_path_factory.mktemp("stand-in") / "art"
    shutil.copytree(tiny_artifacts, art)
    manifest = Manifest.load(art)
    precision = "fp16" if manifest.has_graph("dit", "fp16") else "fp32"
    plan = [_engine(manifest, "dit", precision)]
    for name in ("vae_encoder", "vae_decoder"):
        plan.append(_engine(manifest, name, next(p for p in VAE_ENGINE_PREFERENCE if manifest.has_graph(name, p))))
    return art, build_engines(art, BuildPlan(tuple(plan))), precision


def _trt_pipeline(art, manifest: Manifest, precision: str, cuda_graphs: bool):
    from uniref_deploy.runtime.backends.trt import TrtBackendFactory
    from uniref_deploy.runtime.pipeline import Pipeline

    trt = TrtBackendFactory.create(manifest.model, art, manifest=manifest, precision=precision,
                                   cuda_graphs=cuda_graphs)
    return Pipeline(manifest.model, trt)


_ORT_RESULTS: dict[tuple, np.ndarray] = {}


def _ort_edit(art, manifest: Manifest, trt_pipe, key: tuple, kwargs: dict) -> np.ndarray:
    """The same edit on ONNX Runtime, each graph at its TensorRT engine's precision (cached per case)."""
    from uniref_deploy.runtime.backends.ort import OrtBackend
    from uniref_deploy.runtime.pipeline import Pipeline

    if key not in _ORT_RESULTS:
        ort = {name: OrtBackend(manifest.graph(name, b.engine_spec.precision), art)
               for name, b in trt_pipe.backends.items()}
        pipe = Pipeline(manifest.model, ort)
        try:
            _ORT_RESULTS[key] = pipe(**kwargs)
        finally:
            pipe.close()
    return _ORT_RESULTS[key]


def _references(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    sizes = [(96, 64), (50, 80), (120, 120)][:n]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _embeds(d: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, length, d)).astype(np.float32), np.ones((1, length), dtype=np.int64)


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["enqueue", "cuda-graphs"])
@pytest.mark.parametrize("num_refs", [1, 3])
def test_edits_match_ort_in_both_profiles(engines, fake_trt_module, num_refs, cuda_graphs):
    art, manifest, precision = engines
    trt_pipe = _trt_pipeline(art, manifest, precision, cuda_graphs)
    d = manifest.model.text_hidden_size
    cond, uncond = _embeds(d, 9, 1), _embeds(d, 5, 2)  # cond and uncond alternate text lengths every step
    replays = fake_trt_module.STATS["replays"]
    try:
        for budget, profile in zip(SMALL, (0, 1), strict=True):
            kwargs = dict(image=_references(num_refs), budget=budget.pixels, num_inference_steps=2, seed=7,
                          true_cfg_scale=4.0, prompt_embeds=cond[0], prompt_embeds_mask=cond[1],
                          negative_prompt_embeds=uncond[0], negative_prompt_embeds_mask=uncond[1], output_type="np")
            got = trt_pipe(**kwargs)
            want = _ort_edit(art, manifest, trt_pipe, (num_refs, budget), kwargs)
            assert trt_pipe.last_layout.num_image_tokens > (0 if profile == 0 else SMALL[0].max_image_tokens)
            assert trt_pipe.backends["dit"].last_profile == profile
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=TOLERANCE[precision], rtol=0)
        if cuda_graphs:  # step 2 replays the cond and the uncond graph, each captured on its own context
            assert fake_trt_module.STATS["replays"] - replays >= 2 * len(SMALL)
            assert trt_pipe.backends["dit"]._graphs.captured() == 2 * len(SMALL)
        else:
            assert fake_trt_module.STATS["replays"] == replays
    finally:
        trt_pipe.close()


def _error_lines(stderr: str) -> list[str]:
    """Our lines on stderr (transformers' weight-loading progress bar is not ours); no traceback allowed."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("Loading weights")]


def test_cli_edit_with_a_request_no_profile_holds_exits_2(engines, tmp_path, capsys):
    from uniref_deploy.tools.cli import main

    art, _, precision = engines
    ref = tmp_path / "ref.png"
    _references(1)[0].resize((2048, 256)).save(ref)  # 8:1 at 1024: the VAE (or, tiled, the DiT) passes every max
    out = tmp_path / "out.png"
    code = main(["edit", str(art), "--backend", "trt", "--precision", precision, "--image", str(ref),
                 "--prompt", "make it blue", "--steps", "1", "--budget", "1024", "-o", str(out)])
    err = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1, err
    err = err[0]
    assert "No compiled TensorRT profile of '" in err and "holds this request" in err and "compiled: b448 (" in err
    assert not out.exists() and not list(tmp_path.glob(".out.png.*"))


def test_cli_edit_with_a_plan_from_another_tensorrt_exits_2(engines, fake_trt_module, tmp_path, capsys, monkeypatch):
    from uniref_deploy.tools.cli import main

    art, _, precision = engines
    monkeypatch.setattr(fake_trt_module, "__version__", "10.1.0")
    ref = tmp_path / "ref.png"
    _references(1)[0].save(ref)
    out = tmp_path / "out.png"
    code = main(["edit", str(art), "--backend", "trt", "--precision", precision, "--image", str(ref),
                 "--prompt", "x", "--steps", "1", "-o", str(out)])
    err = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and "but TensorRT 10.1.0 is running" in err[0], err
    assert not out.exists()


def test_three_budgets_plan_one_dit_engine_per_precision(engines, tmp_path, capsys):
    """The tiny artifacts exported for 1024, 1536, 2048: one engine per graph and precision, three profiles each,
    and one ``polygraphy convert`` line per engine."""
    from uniref_deploy.engines.records import PLAN_FILE
    from uniref_deploy.tools.cli import main

    art, manifest, _ = engines
    dst = tmp_path / "art"
    shutil.copytree(art, dst)
    manifest.with_budgets(tuple(b.pixels for b in map(Budget.from_side, (1024, 1536, 2048)))).save(dst)
    precisions = [p for p in ("fp32", "fp16") if manifest.has_graph("dit", p)]
    assert main(["build", str(dst), "--precision", ",".join(precisions), "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = BuildPlan.from_json((dst / PLAN_FILE).read_text())
    dits = [e for e in plan.engines if e.graph == "dit"]
    assert [e.precision for e in dits] == precisions
    assert all([b.side for b in e.budgets] == [1024, 1536, 2048] for e in plan.engines)
    commands = [line for line in out.splitlines() if line.startswith("polygraphy convert")]
    assert len(commands) == len(plan.engines) and all(c.count("--trt-opt-shapes") == 3 for c in commands)
