"""The TensorRT backend and builder on a toy graph, run through the TensorRT stand-in (tests/fakes).

The stand-in executes the plans with ONNX Runtime; these tests check this project's TensorRT code paths (profiles,
shared memory, CUDA graphs, provenance, the builder), not TensorRT itself. The toy graph is
``velocity = hidden_states * timestep + bias`` with the DiT's axis names, so the engine has two profiles whose
image-token ranges differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import numpy as np
import pytest

from uniref_deploy.engines.ranges import make_profile
from uniref_deploy.engines.records import AxisRange, BuildPlan, EnginePlan
from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.errors import BackendError, EngineBuildError, ManifestError
from uniref_deploy.runtime.manifest import GraphSpec, Manifest, ModelConfig, TensorSpec

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CHANNELS = 4
BUDGETS = (Budget.from_pixels(64 * 64), Budget.from_pixels(128 * 128))
MAX_TOKENS = (8, 32)  # image tokens of profile 0 / 1


def _toy_onnx(path) -> None:
    from onnx import TensorProto, helper

    bias = helper.make_tensor("bias", TensorProto.FLOAT, [CHANNELS], [0.5, -1.0, 2.0, 0.25])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
    nodes = [helper.make_node("Unsqueeze", ["timestep", "axes"], ["t3"]),
             helper.make_node("Mul", ["hidden_states", "t3"], ["scaled"]),
             helper.make_node("Add", ["scaled", "bias"], ["velocity"])]
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["batch", "img_tokens", CHANNELS]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("velocity", TensorProto.FLOAT, ["batch", "img_tokens", CHANNELS])],
        [bias, axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def _expected(feeds):
    return feeds["hidden_states"] * feeds["timestep"][:, None, None] + np.array([0.5, -1.0, 2.0, 0.25], np.float32)


INPUTS = (TensorSpec("hidden_states", "float32", ("batch", "img_tokens", CHANNELS)),
          TensorSpec("timestep", "float32", ("batch",)))
OUTPUTS = (TensorSpec("velocity", "float32", ("batch", "img_tokens", CHANNELS)),)


def _engine_plan(graph: GraphSpec, **flags) -> EnginePlan:
    profiles = tuple(make_profile(graph, b, {"batch": AxisRange(1, 1, 2), "img_tokens": AxisRange(1, n, n)})
                     for b, n in zip(BUDGETS, MAX_TOKENS, strict=True))
    return EnginePlan("dit", graph.precision, graph.file, graph.sha256, "engines/dit.fp32.plan", profiles,
                      builder_optimization_level=1, **flags)


@pytest.fixture
def toy(tmp_path, fake_trt):
    """An artifact folder with the toy graph, and its one-engine build plan."""
    (tmp_path / "onnx").mkdir()
    _toy_onnx(tmp_path / "onnx" / "toy.onnx")
    sha = hashlib.sha256((tmp_path / "onnx" / "toy.onnx").read_bytes()).hexdigest()
    graph = GraphSpec("dit", "fp32", "onnx/toy.onnx", sha, INPUTS, OUTPUTS)
    config = ModelConfig("qwen-image", {"joint_attention_dim": 8}, {"z_dim": 1}, {})
    Manifest(config, budgets=tuple(b.pixels for b in BUDGETS), graphs=(graph,)).save(tmp_path)
    return tmp_path, graph


def _build(art, graph, **flags) -> Manifest:
    from uniref_deploy.engines.build import build_engines

    return build_engines(art, BuildPlan((_engine_plan(graph, **flags),)))


def _backend(art, manifest: Manifest, **options):
    from uniref_deploy.runtime.backends.trt import TrtBackend

    (spec,) = manifest.engines
    return TrtBackend("dit", INPUTS, OUTPUTS, spec, art, **options)


def _feeds(batch: int, tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"hidden_states": rng.standard_normal((batch, tokens, CHANNELS)).astype(np.float32),
            "timestep": rng.uniform(0.1, 1.0, batch).astype(np.float32)}


# --- the builder ------------------------------------------------------------------------------------------------


def test_build_writes_one_engine_with_a_profile_per_bucket(toy, fake_trt):
    art, graph = toy
    manifest = _build(art, graph)
    (spec,) = manifest.engines
    assert spec.budgets == tuple(b.pixels for b in BUDGETS) and spec.name == "dit.fp32"
    assert hashlib.sha256((art / spec.file).read_bytes()).hexdigest() == spec.sha256
    p = spec.provenance
    assert p["tensorrt_version"] == fake_trt.__version__ and p["compute_capability"] == "9.0"
    assert p["engine_bytes"] == (art / spec.file).stat().st_size and len(p["profiles"]) == 2
    assert (art / "engines" / "timing.cache").stat().st_size > 0
    assert manifest.stage("build").results["built"] == ["dit.fp32"]
    engine = fake_trt.Runtime(None).deserialize_cuda_engine((art / spec.file).read_bytes())
    assert engine.num_optimization_profiles == 2
    assert engine.get_tensor_profile_shape("hidden_states", 1)[2] == (2, MAX_TOKENS[1], CHANNELS)
    assert fake_trt.STATS["deserialized"] >= 1  # only the test deserialised: the builder writes bytes directly


def test_rebuild_reuses_and_force_rebuilds(toy, fake_trt):
    from uniref_deploy.engines.build import BuildOptions, build_engines

    art, graph = toy
    _build(art, graph)
    builds = fake_trt.STATS["builds"]
    again = build_engines(art, BuildPlan((_engine_plan(graph),)))
    assert again.stage("build").results == {**again.stage("build").results, "built": [], "reused": ["dit.fp32"]}
    assert fake_trt.STATS["builds"] == builds
    forced = build_engines(art, BuildPlan((_engine_plan(graph),)), BuildOptions(force=True))
    assert forced.stage("build").results["built"] == ["dit.fp32"] and fake_trt.STATS["builds"] == builds + 1


def test_build_failures_are_one_line_errors(toy, fake_trt):
    from uniref_deploy.engines.build import build_engines

    art, graph = toy
    plan = _engine_plan(graph)
    bad_profile = dataclasses.replace(plan.profiles[0], shapes=plan.profiles[0].shapes[:1])  # timestep missing
    with pytest.raises(EngineBuildError, match="TensorRT could not build dit.fp32"):
        build_engines(art, BuildPlan((dataclasses.replace(plan, profiles=(bad_profile,)),)))
    (art / "onnx" / "toy.onnx").write_bytes(b"not onnx")
    with pytest.raises(ManifestError, match="does not match the sha256"):
        build_engines(art, BuildPlan((plan,)))
    from uniref_deploy.engines.build import BuildOptions

    with pytest.raises(EngineBuildError, match="ONNX parser rejected toy.onnx"):
        build_engines(art, BuildPlan((plan,)), BuildOptions(verify_onnx=False))
    assert not (art / "engines" / "dit.fp32.plan").exists()
    stale = dataclasses.replace(plan, onnx_sha256="0" * 64)
    with pytest.raises(ManifestError, match="made from another"):
        build_engines(art, BuildPlan((stale,)))


def test_build_environment_from_the_fake(fake_trt):
    import fake_cudart

    from uniref_deploy.engines.build import build_environment, check_build_environment

    assert check_build_environment() is None
    env = build_environment()
    assert (env.tensorrt_version, env.compute_capability) == (fake_trt.__version__, "9.0")
    fake_cudart.DEVICE.count = 0
    assert "0 devices" in check_build_environment()


# --- the backend --------------------------------------------------------------------------------------------------


def test_smallest_profile_that_holds_is_used(toy):
    art, graph = toy
    dit = _backend(art, _build(art, graph))
    try:
        for batch, tokens, profile in ((1, 3, 0), (2, 8, 0), (1, 9, 1), (2, 32, 1), (1, 1, 0)):
            feeds = _feeds(batch, tokens, seed=tokens)
            np.testing.assert_allclose(dit.infer(feeds)["velocity"], _expected(feeds), rtol=1e-6)
            assert dit.last_profile == profile and dit.last_gpu_ms is not None
    finally:
        dit.deactivate()


def test_a_request_no_profile_holds_is_refused(toy):
    art, graph = toy
    dit = _backend(art, _build(art, graph))
    try:
        with pytest.raises(BackendError, match=r"img_tokens=33.*compiled: b64 \(batch 1\.\.2, img_tokens 1\.\.8\); "
                                               r"b128 .*img_tokens 1\.\.32"):
            dit.infer(_feeds(1, 33))
    finally:
        dit.deactivate()


def test_cuda_graphs_per_shape_key_with_alternating_shapes(toy, fake_trt, caplog):
    import fake_cudart

    art, graph = toy
    manifest = _build(art, graph)
    plain, graphs = _backend(art, manifest), _backend(art, manifest, cuda_graphs=True)
    try:
        for step in range(3):  # cond / uncond alternate like a CFG loop; both profiles are used
            for tokens in (5, 7, 20):
                feeds = _feeds(1, tokens, seed=10 * step + tokens)
                np.testing.assert_array_equal(graphs.infer(feeds)["velocity"], plain.infer(feeds)["velocity"])
        assert len(graphs._graphs) == graphs._graphs.captured() == 3
        assert fake_trt.STATS["replays"] == 6  # steps 2 and 3 replayed every key
        modes = set(fake_cudart.DEVICE.capture_modes)
        assert modes == {fake_cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal}
        assert not any("capture failed" in r.message for r in caplog.records)
    finally:
        plain.deactivate()
        graphs.deactivate()


def test_failed_capture_falls_back_and_clears_the_error(toy, caplog):
    import fake_cudart

    art, graph = toy
    dit = _backend(art, _build(art, graph), cuda_graphs=True)
    fake_cudart.DEVICE.fail_captures = True
    try:
        with caplog.at_level(logging.WARNING):
            for tokens in (4, 4, 6):
                feeds = _feeds(1, tokens, seed=tokens)
                np.testing.assert_allclose(dit.infer(feeds)["velocity"], _expected(feeds), rtol=1e-6)
        assert dit._graphs.captured() == 0 and len(dit._graphs) == 2
        warnings = [r.message for r in caplog.records if "capture failed" in r.message]
        assert len(warnings) == 2 and "cudaErrorStreamCaptureInvalidated" in warnings[0]
        assert fake_cudart.DEVICE.last_error == fake_cudart.cudaError_t.cudaSuccess
    finally:
        dit.deactivate()


def test_captured_graphs_are_bounded(toy):
    art, graph = toy
    dit = _backend(art, _build(art, graph), cuda_graphs=True, max_cuda_graphs=2)
    try:
        for tokens in (1, 2, 3, 2):
            dit.infer(_feeds(1, tokens))
        assert len(dit._graphs) == 2 and (0, (("hidden_states", (1, 1, 4)), ("timestep", (1,)))) not in dit._graphs
    finally:
        dit.deactivate()


def test_stages_share_one_activation_buffer(toy, fake_trt):
    """A second engine needing more memory grows the shared buffer; the first rebinds and drops its graphs."""
    import fake_cudart

    from uniref_deploy.runtime.cuda import SharedActivation

    art, graph = toy
    manifest = _build(art, graph)
    shared = SharedActivation()
    small = _backend(art, manifest, activation=shared, cuda_graphs=True)
    small.activate()
    small.infer(_feeds(1, 3))
    first = (shared.ptr, shared.size)
    assert len(small._graphs) == 1
    # a bigger engine: the same graph with larger profiles
    big_plan = dataclasses.replace(_engine_plan(graph), engine_file="engines/dit.big.plan", profiles=tuple(
        make_profile(graph, b, {"batch": AxisRange(1, 1, 2), "img_tokens": AxisRange(1, n, n)})
        for b, n in zip(BUDGETS, (64, 256), strict=True)))
    from uniref_deploy.engines.build import build_engines

    big_spec = next(e for e in build_engines(art, BuildPlan((big_plan,))).engines if e.file == big_plan.engine_file)
    from uniref_deploy.runtime.backends.trt import TrtBackend

    big = TrtBackend("dit", INPUTS, OUTPUTS, big_spec, art, activation=shared)
    try:
        big.infer(_feeds(2, 200))
        assert shared.size > first[1] and len(fake_cudart.DEVICE.memory) > 0
        assert len(small._graphs) == 0  # its graphs captured the old pointer
        feeds = _feeds(1, 3, seed=5)
        np.testing.assert_allclose(small.infer(feeds)["velocity"], _expected(feeds), rtol=1e-6)
    finally:
        small.deactivate()
        big.deactivate()
    assert shared.ptr is None and fake_cudart.DEVICE.memory == {}  # everything freed


def test_weight_streaming_budget_is_applied(toy, fake_trt):
    art, graph = toy
    manifest = _build(art, graph, weight_streaming_budget=0)
    (spec,) = manifest.engines
    assert spec.provenance["weight_streaming_budget"] == 0
    dit = _backend(art, manifest)
    try:
        feeds = _feeds(1, 4)
        np.testing.assert_allclose(dit.infer(feeds)["velocity"], _expected(feeds), rtol=1e-6)
        engine = dit._engine.engine
        assert engine.streamable_weights_size > 0 and engine.weight_streaming_budget_v2 == 0
        assert dit.activation.size >= engine.device_memory_size_v2  # sized after the budget (scratch included)
    finally:
        dit.deactivate()


def test_plan_from_another_tensorrt_or_gpu_is_refused(toy, fake_trt, monkeypatch):
    import fake_cudart

    art, graph = toy
    manifest = _build(art, graph)
    monkeypatch.setattr(fake_trt, "__version__", "10.0.0")
    with pytest.raises(BackendError, match=r"built with TensorRT 10\.99\.0\+fake, but TensorRT 10\.0\.0 is running"):
        _backend(art, manifest).activate()
    (spec,) = manifest.engines
    unrecorded = dataclasses.replace(manifest, engines=(dataclasses.replace(spec, provenance={}),))
    with pytest.raises(BackendError, match="could not deserialise"):  # TensorRT itself refuses the plan
        _backend(art, unrecorded).activate()
    monkeypatch.undo()
    fake_cudart.DEVICE.props.major = 8
    with pytest.raises(BackendError, match=r"compute capability 9\.0 .*compute capability 8\.0"):
        _backend(art, manifest).activate()
    assert fake_cudart.DEVICE.memory == {}  # a refused activation frees what it allocated


def test_damaged_plan_is_refused(toy):
    art, graph = toy
    manifest = _build(art, graph)
    (art / manifest.engines[0].file).write_bytes(b"garbage")
    with pytest.raises(ManifestError, match="does not match the manifest's sha256"):
        _backend(art, manifest).activate()
    (art / manifest.engines[0].file).unlink()
    with pytest.raises(ManifestError, match="is missing"):
        _backend(art, manifest).activate()


# --- the stand-in is strict where TensorRT is ---------------------------------------------------------------------


def test_stand_in_refuses_what_tensorrt_refuses(toy, fake_trt):
    import fake_cudart

    from uniref_deploy.runtime.cuda import device_alloc

    art, graph = toy
    (spec,) = _build(art, graph).engines
    engine = fake_trt.Runtime(None).deserialize_cuda_engine((art / spec.file).read_bytes())
    ctx = engine.create_execution_context(fake_trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    assert ctx.active_optimization_profile == 0
    assert not ctx.set_input_shape("hidden_states", (1, 9, CHANNELS))  # outside profile 0
    assert ctx.set_optimization_profile_async(1, 0) and ctx.set_input_shape("hidden_states", (1, 9, CHANNELS))
    ctx.set_input_shape("timestep", (1,))
    assert not ctx.execute_async_v3(0)  # no addresses, no device memory
    buffers = {n: device_alloc(4096) for n in ("hidden_states", "timestep", "velocity")}
    for name, ptr in buffers.items():
        ctx.set_tensor_address(name, ptr)
    assert not ctx.execute_async_v3(0)  # user-managed memory not set
    ctx.set_device_memory(device_alloc(engine.device_memory_size_v2), engine.device_memory_size_v2)
    assert ctx.execute_async_v3(0)
    assert ctx.set_optimization_profile_async(0, 0) and not ctx.execute_async_v3(0)  # shapes invalidated
    # a capture replayed after its context ran other shapes raises
    ctx.set_input_shape("hidden_states", (1, 2, CHANNELS))
    ctx.set_input_shape("timestep", (1,))
    stream = fake_cudart.cudaStreamCreate()[1]
    fake_cudart.cudaStreamBeginCapture(stream, fake_cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    assert ctx.execute_async_v3(stream)  # no warm-up at these shapes: the capture is invalidated
    assert fake_cudart.cudaStreamEndCapture(stream)[0] == fake_cudart.cudaError_t.cudaErrorStreamCaptureInvalidated
    fake_cudart.cudaGetLastError()
    assert ctx.execute_async_v3(stream)  # warm-up
    fake_cudart.cudaStreamBeginCapture(stream, fake_cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    ctx.execute_async_v3(stream)
    err, graph_handle = fake_cudart.cudaStreamEndCapture(stream)
    graph_exec = fake_cudart.cudaGraphInstantiate(graph_handle, 0)[1]
    fake_cudart.cudaGraphLaunch(graph_exec, stream)  # same shapes: fine
    ctx.set_input_shape("hidden_states", (1, 3, CHANNELS))
    assert ctx.execute_async_v3(stream)
    with pytest.raises(RuntimeError, match="replayed after its context ran"):
        fake_cudart.cudaGraphLaunch(graph_exec, stream)


def test_inspect_shows_engines_with_their_profiles(toy):
    from uniref_deploy.tools.inspecting import format_text, inspect_artifacts

    art, graph = toy
    _build(art, graph)
    info = inspect_artifacts(art)
    (engine,) = info["engines"]
    assert engine["budgets"] == [b.pixels for b in BUDGETS] and engine["present"]
    (planned,) = info["engine_plan"]["engines"]
    assert [p["budget"] for p in planned["profiles"]] == [b.pixels for b in BUDGETS]
    lines = format_text(info).splitlines()
    assert any(line.split()[-3:] == ["profiles", "b64,", "b128"] for line in lines)
    assert any(line.strip().startswith("profile 1: b128: batch 1/1/2, img_tokens 1/32/32") for line in lines)


def test_cli_build_through_the_stand_in(toy, capsys):
    from uniref_deploy.tools.cli import main

    art, graph = toy
    manifest = Manifest.load(art)
    manifest.with_budgets((1024 * 1024,)).save(art)
    assert main(["build", str(art), "--precision", "fp32", "--opt-level", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("engines/dit.fp32.plan  profiles 1024 ") and "TensorRT 10.99.0+fake sm 9.0" in out[0]
    assert [line.split(":")[0] for line in out[1:3]] == ["skipped vae_encoder.fp16", "skipped vae_decoder.fp16"]
    assert out[-1].startswith("built 1, reused 0")
    assert main(["build", str(art), "--precision", "fp16"]) == 2  # nothing to build: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Nothing to build (dit.fp16: the manifest has no dit.fp16")
