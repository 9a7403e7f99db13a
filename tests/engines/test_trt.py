"""The TensorRT backend and engine build.

The first group runs everywhere (import hygiene, engine selection from the manifest, provenance checks). The
``trt``/``gpu`` group builds engines with real TensorRT from the tiny exported artifacts (session fixture
``tiny_artifacts``) and compares ``TrtBackend`` with ``OrtBackend``, each graph at its engine's precision with that
precision's tolerance; it skips with the reason unless TensorRT and a GPU are present. The same code paths run
everywhere through the TensorRT stand-in in ``test_trt_backend.py`` and ``test_trt_tiny.py``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from uniref_deploy.runtime.errors import BackendError
from uniref_deploy.runtime.manifest import EngineSpec, Manifest, ModelConfig

# --- everywhere ------------------------------------------------------------------------------------------


def _config() -> ModelConfig:
    transformer = {"in_channels": 16, "out_channels": 4, "patch_size": 2, "axes_dims_rope": [4, 6, 6],
                   "joint_attention_dim": 32}
    vae = {"z_dim": 4, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
    return ModelConfig("qwen-image", transformer, vae, {})


BUCKETS = (1024 * 1024, 2048 * 2048)


def _engine(graph: str, precision: str, **provenance) -> EngineSpec:
    return EngineSpec(graph, precision, f"engines/{graph}.{precision}.plan", "0" * 64, BUCKETS, provenance)


def _engines_manifest() -> Manifest:
    engines = [_engine("dit", "fp16"), _engine("dit", "bf16"), _engine("vae_encoder", "fp32"),
               _engine("vae_decoder", "fp16"), _engine("vae_decoder", "fp32")]
    return Manifest(_config(), budgets=BUCKETS, engines=tuple(engines))


def test_import_stays_light():
    code = ("import sys, uniref_deploy.runtime.backends.trt, uniref_deploy.engines.build, uniref_deploy.engines.plan,"
            " uniref_deploy.engines.render, uniref_deploy.runtime.cuda;"
            "print(sorted(m for m in ('tensorrt', 'torch', 'cuda', 'polygraphy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_factory_picks_engines_per_graph(tmp_path):
    from uniref_deploy.runtime.backends.trt import TrtBackend, TrtBackendFactory

    m = _engines_manifest()
    backends = TrtBackendFactory.create(m.model, tmp_path, manifest=m, precision="fp16")
    assert all(isinstance(b, TrtBackend) and not b.is_active for b in backends.values())
    assert backends["dit"].engine_spec.name == "dit.fp16"
    assert [b.side for b in backends["dit"].budgets] == [1024, 2048]
    assert backends["vae_encoder"].engine_spec.precision == "fp32"  # fp16 absent: fall back
    assert backends["vae_decoder"].engine_spec.precision == "fp16"
    assert len({id(b.activation) for b in backends.values()}) == 1  # one activation buffer for all stages
    assert [s.name for s in backends["dit"].inputs][0] == "hidden_states"
    bf16 = TrtBackendFactory.create(m.model, tmp_path, manifest=m, precision="bf16")
    assert bf16["dit"].engine_spec.precision == "bf16"
    assert bf16["vae_decoder"].engine_spec.precision == "fp16"
    auto = TrtBackendFactory.create(m.model, tmp_path, manifest=m, precision=None)
    assert auto["dit"].engine_spec.precision == "fp16"


def test_factory_names_what_is_missing(tmp_path):
    from uniref_deploy.runtime.backends.trt import TrtBackendFactory

    m = _engines_manifest()
    with pytest.raises(BackendError, match=r"no TensorRT engine for 'dit' at precision 'fp8' \(have: .*dit.fp16"):
        TrtBackendFactory.create(m.model, tmp_path, manifest=m, precision="fp8")
    with pytest.raises(BackendError, match="'vae_encoder'"):
        TrtBackendFactory.create(m.model, tmp_path, manifest=dataclasses.replace(m, engines=m.engines[:2]))


def test_provenance_mismatch_names_both():
    from uniref_deploy.runtime.backends.trt import check_provenance

    spec = _engine("dit", "fp16", tensorrt_version="10.8.0", compute_capability="9.0", gpu_name="H100")
    check_provenance(spec, "10.8.0", "9.0")
    check_provenance(_engine("dit", "fp16"), "10.9.0", "8.9")  # nothing recorded: nothing to refuse
    with pytest.raises(BackendError, match=r"TensorRT 10\.8\.0, but TensorRT 10\.9\.0 is running"):
        check_provenance(spec, "10.9.0", "9.0")
    with pytest.raises(BackendError, match=r"compute capability 9\.0 \(H100\).*compute capability 8\.9"):
        check_provenance(spec, "10.8.0", "8.9")


def test_backend_without_engines_is_refused(tmp_path):
    from uniref_deploy.runtime.backends.trt import TrtBackend
    from uniref_deploy.runtime.graphs import graph_io

    inputs, outputs = graph_io("dit", _config())
    with pytest.raises(BackendError, match="No TensorRT engine"):
        TrtBackend("dit", inputs, outputs, None, tmp_path)


def test_v1_per_bucket_engine_records_are_dropped_on_load(tmp_path, caplog):
    m = _engines_manifest()
    data = {**json.loads(m.to_json()), "schema_version": 1}  # as written before schema 2
    data["engines"].append({"graph": "dit", "budget": 1024, "precision": "fp32", "file": "engines/dit.b1024.fp32.plan",
                            "sha256": "0" * 64, "provenance": {}})
    loaded = Manifest.from_dict(data)
    assert loaded.engines == m.engines
    assert "per-bucket TensorRT engine record" in caplog.text


# --- with TensorRT and a GPU -----------------------------------------------------------------------------


def _require_trt_gpu() -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    from uniref_deploy.engines.build import check_build_environment

    reason = check_build_environment()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def built(request, tmp_path_factory):
    """The tiny artifacts copied to a temp folder, with engines built for the smallest budget."""
    _require_trt_gpu()
    try:
        src = request.getfixturevalue("tiny_artifacts")
    except pytest.FixtureLookupError:
        pytest.skip("the tiny_artifacts fixture is not available")
    from uniref_deploy.engines.build import build_engines
    from uniref_deploy.engines.plan import PlanOptions, make_plan
    from uniref_deploy.runtime.budget import Budget

    art = tmp_path_factory.mktemp("trt") / "art"
    shutil.copytree(Path(src), art)  # engines are written into a copy; the session fixture stays untouched
    manifest = Manifest.load(art)
    precision = next(p for p in ("fp16", "bf16", "fp32") if manifest.has_graph("dit", p))
    budget = min((Budget.coerce(b) for b in manifest.budgets), default=Budget.from_side(1024))
    plan = make_plan(manifest, (budget,), (precision,), PlanOptions(builder_optimization_level=1))
    return art, build_engines(art, plan), plan, precision


def _feeds(specs, axes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        shape = tuple(axes[d] if isinstance(d, str) else d for d in s.shape)
        if s.dtype == "bool":
            feeds[s.name] = np.ones(shape, dtype=bool)
        elif s.dtype.startswith("int"):
            feeds[s.name] = (np.arange(int(np.prod(shape))) % 2).reshape(shape).astype(s.dtype)
        elif s.name == "timestep":
            feeds[s.name] = np.full(shape, 0.5, dtype=np.float32)
        else:
            feeds[s.name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
    return feeds


def _backends(art, manifest, precision, **options):
    """TensorRT backends, and ORT backends running each graph at the precision of its TensorRT engine."""
    from uniref_deploy.runtime.backends.ort import OrtBackend
    from uniref_deploy.runtime.backends.trt import TrtBackendFactory

    trt = TrtBackendFactory.create(manifest.model, art, manifest=manifest, precision=precision, **options)
    ort = {name: OrtBackend(manifest.graph(name, b.engine_spec.precision), art) for name, b in trt.items()}
    return trt, ort


def _tolerance(precision: str) -> dict[str, float]:
    """TensorRT vs ONNX Runtime at the same precision: kernels differ, so fp16/bf16 get their rounding's slack."""
    return {"fp32": {"rtol": 1e-3, "atol": 2e-3}, "fp16": {"rtol": 1e-2, "atol": 1e-2}}.get(
        precision, {"rtol": 3e-2, "atol": 3e-2})


@pytest.mark.trt
@pytest.mark.gpu
def test_build_records_provenance(built):
    import tensorrt

    art, manifest, plan, _ = built
    record = manifest.stage("build")
    assert sorted(record.results["built"]) == sorted(e.name for e in plan.engines)
    for engine in plan.engines:
        spec = next(e for e in manifest.engines if e.file == engine.engine_file)
        assert spec.budgets == tuple(b.pixels for b in engine.budgets)
        p = spec.provenance
        assert p["tensorrt_version"] == tensorrt.__version__ and p["compute_capability"]
        assert p["onnx_sha256"] == engine.onnx_sha256 and p["plan_sha256"] == engine.settings_sha256()
        assert p["engine_bytes"] == (art / spec.file).stat().st_size > 0


@pytest.mark.trt
@pytest.mark.gpu
def test_rebuild_reuses_unchanged_engines(built):
    from uniref_deploy.engines.build import build_engines

    art, _, plan, _ = built
    again = build_engines(art, plan).stage("build").results
    assert again["built"] == [] and sorted(again["reused"]) == sorted(e.name for e in plan.engines)


@pytest.mark.trt
@pytest.mark.gpu
def test_trt_matches_ort(built):
    from uniref_deploy.runtime.packing import pack_references

    art, manifest, plan, precision = built
    trt, ort = _backends(art, manifest, precision)
    layout = pack_references([(512, 384), (300, 600)], plan.engines[0].budgets[0].pixels)
    z = manifest.model.latent_channels
    cases = {
        "dit": {"batch": 1, "img_tokens": layout.num_image_tokens, "txt_tokens": 37},
        "vae_encoder": {"batch": 1, "height": layout.references[0].height, "width": layout.references[0].width},
        "vae_decoder": {"batch": 1, "latent_height": layout.target.latent_h, "latent_width": layout.target.latent_w},
    }
    try:
        for name, axes in cases.items():
            feeds = _feeds(trt[name].inputs, axes)
            got, want = trt[name].infer(feeds), ort[name].infer(feeds)
            tolerance = _tolerance(trt[name].engine_spec.precision)  # each graph at its engine's precision
            for key, value in want.items():
                assert got[key].shape == value.shape and got[key].dtype == np.float32
                np.testing.assert_allclose(got[key], value, err_msg=f"{name}.{key}", **tolerance)
        assert trt["vae_decoder"].last_gpu_ms is not None and z > 0
    finally:
        for b in (*trt.values(), *ort.values()):
            b.deactivate()


@pytest.mark.trt
@pytest.mark.gpu
def test_cuda_graph_replay_matches_plain_runs(built):
    from uniref_deploy.runtime.backends.trt import TrtBackendFactory

    art, manifest, _, precision = built
    plain = TrtBackendFactory.create(manifest.model, art, manifest=manifest, precision=precision)["dit"]
    graphs = TrtBackendFactory.create(manifest.model, art, manifest=manifest, precision=precision,
                                      cuda_graphs=True)["dit"]
    try:
        for tokens, text in ((256, 20), (512, 31), (256, 20), (512, 31)):  # cond/uncond alternate
            feeds = _feeds(plain.inputs, {"batch": 1, "img_tokens": tokens, "txt_tokens": text}, seed=tokens)
            want = plain.infer(feeds)["velocity"]
            np.testing.assert_allclose(graphs.infer(feeds)["velocity"], want, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(graphs.infer(feeds)["velocity"], want, rtol=1e-5, atol=1e-5)  # replayed
        assert len(graphs._graphs) == 2
    finally:
        plain.deactivate()
        graphs.deactivate()


@pytest.mark.trt
@pytest.mark.gpu
def test_request_beyond_the_buckets_is_refused(built):
    from uniref_deploy.runtime.backends.trt import TrtBackendFactory

    art, manifest, plan, precision = built
    dit = TrtBackendFactory.create(manifest.model, art, manifest=manifest, precision=precision)["dit"]
    budget = plan.engines[0].budgets[-1]
    too_many = budget.max_image_tokens + 1
    try:
        with pytest.raises(BackendError, match=rf"img_tokens={too_many}.*compiled: b{budget.name} \(.*img_tokens 1\.\."):
            dit.infer(_feeds(dit.inputs, {"batch": 1, "img_tokens": too_many, "txt_tokens": 8}))
    finally:
        dit.deactivate()


@pytest.mark.trt
@pytest.mark.gpu
def test_engine_from_another_tensorrt_is_refused(built):
    from uniref_deploy.runtime.backends.trt import TrtBackendFactory

    art, manifest, _, precision = built
    stale = dataclasses.replace(manifest, engines=tuple(
        dataclasses.replace(e, provenance={**e.provenance, "tensorrt_version": "0.0.0"}) for e in manifest.engines))
    dit = TrtBackendFactory.create(stale.model, art, manifest=stale, precision=precision)["dit"]
    with pytest.raises(BackendError, match=r"built with TensorRT 0\.0\.0, but TensorRT .* is running"):
        dit.activate()
    assert not dit.is_active
