"""Tests for the GPU memory plan (``engines/memory.py``) and ``build --dry-run --gpu-memory``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from uniref_deploy.engines.memory import (
    GIB,
    MemoryPlan,
    WeightStats,
    activation_bytes,
    memory_plan,
    onnx_weight_stats,
    profile_memory,
)
from uniref_deploy.engines.plan import make_plan
from uniref_deploy.engines.ranges import axis_ranges
from uniref_deploy.engines.records import PLAN_FILE, BuildPlan, PlanOptions
from uniref_deploy.runtime.budget import TRAINED_SIDES, Budget
from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.graphs import DIT, VAE_DECODER, VAE_ENCODER, graph_io
from uniref_deploy.runtime.manifest import GraphSpec, Manifest, ModelConfig
from uniref_deploy.tools.cli import main

SIDES = TRAINED_SIDES
CHANNELS = 96  # full-resolution channels of the synthetic VAE graphs


def _config() -> ModelConfig:
    transformer = {"in_channels": 64, "out_channels": 16, "patch_size": 2, "axes_dims_rope": [16, 56, 56],
                   "joint_attention_dim": 3584, "num_attention_heads": 24, "attention_head_dim": 128}
    vae = {"z_dim": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16,
           "temperal_downsample": [False, True, True]}
    return ModelConfig("qwen-image", transformer, vae, {})


def _save(path: Path, nodes, inits, external: bool) -> None:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)


def _dit_graph(path: Path, dtype=np.float16) -> int:
    """Two MatMuls with ``dtype`` weights (external data); returns their bytes."""
    w1, w2 = np.ones((64, 32), dtype), np.ones((32, 48), dtype)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    _save(path, nodes, [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")], external=True)
    return w1.nbytes + w2.nbytes


def _vae_graph(path: Path, first_out: int, last_in: int) -> None:
    wa = np.ones((first_out, 3, 3, 3), np.float16)
    wb = np.ones((3, last_in, 3, 3), np.float16)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["h"]), helper.make_node("Conv", ["h", "wb"], ["y"])]
    _save(path, nodes, [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb")], external=False)


def _artifact(root: Path, budgets=SIDES) -> Manifest:
    config = _config()
    graphs = []
    for name, precision in ((DIT, "fp16"), (VAE_ENCODER, "fp16"), (VAE_DECODER, "fp16")):
        file = f"onnx/{name}.{precision}.onnx"
        if name == DIT:
            _dit_graph(root / file)
        else:
            _vae_graph(root / file, CHANNELS, CHANNELS)
        inputs, outputs = graph_io(name, config)
        sha = hashlib.sha256((root / file).read_bytes()).hexdigest()
        graphs.append(GraphSpec(name, precision, file, sha, inputs, outputs))
    manifest = Manifest(config, budgets=tuple(b * b for b in budgets), graphs=tuple(graphs))
    manifest.save(root)
    return manifest


# --- weights from the graph proto ------------------------------------------------------------------------------

DTYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64,
          TensorProto.INT8: np.int8}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(1, 6), min_size=0, max_size=3)),
                min_size=1, max_size=5),
       st.booleans())
def test_weight_bytes_match_the_loaded_arrays_without_reading_external_data(tmp_path_factory, tensors, external):
    path = tmp_path_factory.mktemp("w") / "g.onnx"
    inits = [numpy_helper.from_array(np.ones(shape, DTYPES[dt]), f"t{i}") for i, (dt, shape) in enumerate(tensors)]
    const = numpy_helper.from_array(np.ones((5, 3), np.float32), "c")
    nodes = [helper.make_node("Constant", [], ["c"], value=const), helper.make_node("Identity", ["x"], ["y"])]
    _save(path, nodes, inits, external)
    loaded = onnx.load(str(path))
    arrays = [numpy_helper.to_array(t) for t in loaded.graph.initializer] + [numpy_helper.to_array(const)]
    if external:
        (path.parent / "g.onnx.data").write_bytes(b"")  # external data gone: still sized from the proto
    stats = onnx_weight_stats(path)
    assert stats.total == sum(a.nbytes for a in arrays)
    assert stats.largest == max(a.nbytes for a in arrays)


def test_float8_weights_count_one_byte(tmp_path):
    q = helper.make_tensor("q", TensorProto.FLOAT8E4M3FN, [128, 64], np.zeros(128 * 64, np.uint8).tobytes(), raw=True)
    _save(tmp_path / "g.onnx", [helper.make_node("Identity", ["x"], ["y"])], [q], external=True)
    assert onnx_weight_stats(tmp_path / "g.onnx").total == 128 * 64
    fp16 = _dit_graph(tmp_path / "h.onnx", np.float16)
    fp32 = _dit_graph(tmp_path / "f.onnx", np.float32)
    assert onnx_weight_stats(tmp_path / "h.onnx").total == fp16 == fp32 // 2


def test_conv_channels_are_read_from_the_graph(tmp_path):
    _vae_graph(tmp_path / "v.onnx", 40, 24)
    assert onnx_weight_stats(tmp_path / "v.onnx").conv_channels == (40, 24)


# --- properties of the analytic parts --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200 * GIB), st.integers(1, 200 * GIB), st.integers(0, 50 * GIB), st.integers(1, 200 * GIB),
       st.booleans())
def test_fits_and_streaming_budget_are_consistent(weights, largest_frac, activations, gpu, streamable):
    largest = min(weights, largest_frac)
    w = WeightStats(weights, largest)
    p = profile_memory(Budget.from_side(1024), activations, w, gpu, streamable)
    assert p.fits == (p.need_bytes <= gpu)
    assert p.need_bytes == weights + activations + GIB
    if p.streaming_budget is not None:
        assert not p.fits and streamable
        assert 0 <= p.streaming_budget <= weights
        assert p.streaming_budget + activations + GIB + 2 * largest <= gpu
    # more memory never turns a fitting or runnable profile into one that is not
    more = profile_memory(Budget.from_side(1024), activations, w, gpu + GIB, streamable)
    assert more.fits >= p.fits and more.runnable >= p.runnable


@pytest.mark.parametrize("graph", [DIT, VAE_ENCODER, VAE_DECODER])
def test_activations_grow_with_the_bucket_and_halve_from_fp32(graph):
    config, w = _config(), WeightStats(0, 0, (CHANNELS, CHANNELS))
    sizes = []
    for side in SIDES:
        axes = {k: r.max for k, r in axis_ranges(graph, Budget.from_side(side), PlanOptions()).items()}
        fp16 = activation_bytes(graph, axes, config, w, "fp16")
        assert activation_bytes(graph, axes, config, w, "fp32") == 2 * fp16
        sizes.append(fp16)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40000), st.integers(1, 1024), st.integers(1, 2))
def test_dit_activations_are_linear_in_tokens(img, txt, batch):
    config, w = _config(), WeightStats(0, 0)
    one = activation_bytes(DIT, {"batch": batch, "img_tokens": img, "txt_tokens": txt}, config, w, "fp16")
    two = activation_bytes(DIT, {"batch": batch, "img_tokens": 2 * img, "txt_tokens": 2 * txt}, config, w, "fp16")
    assert two == 2 * one
    # fused attention: far below a single fp16 tokens x tokens score tensor per head once sequences are long
    if img + txt > 4096:
        assert one < batch * 24 * (img + txt) ** 2 * 2


# --- the plan and the CLI --------------------------------------------------------------------------------------


def test_memory_plan_round_trips_through_plan_json(tmp_path):
    manifest = _artifact(tmp_path)
    plan = make_plan(manifest, SIDES)
    mem = memory_plan(plan, manifest.model, tmp_path, 80)
    assert [e.engine for e in mem.engines] == [e.name for e in plan.engines]
    assert mem.engines[0].weight_bytes == (64 * 32 + 32 * 48) * 2
    assert MemoryPlan.from_dict(mem.to_dict()) == mem
    import dataclasses

    with_mem = dataclasses.replace(plan, memory=mem)
    assert BuildPlan.from_json(with_mem.to_json()) == with_mem


def test_a_middle_gpu_runs_the_small_buckets_only(tmp_path):
    manifest = _artifact(tmp_path)
    plan = make_plan(manifest, SIDES)
    enc = plan.engine("vae_encoder.fp16")
    acts = [activation_bytes(VAE_ENCODER, {k: r.max for k, r in p.axes}, manifest.model,
                             WeightStats(0, 0, (CHANNELS, CHANNELS)), "fp16") for p in enc.profiles]
    gib = (acts[0] + 2 * GIB) / GIB  # the 1024 encoder fits, the 2048 one does not
    mem = memory_plan(plan, manifest.model, tmp_path, gib)
    runnable = mem.runnable_budgets()
    assert Budget.from_side(1024) in runnable and Budget.from_side(2048) not in runnable


def test_cli_dry_run_gpu_memory_prints_and_keeps_the_plan(tmp_path, capsys):
    _artifact(tmp_path)
    assert main(["build", str(tmp_path), "--dry-run", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "memory plan" in out and "runnable buckets: 1024, 1536, 2048" in out
    written = BuildPlan.from_json((tmp_path / PLAN_FILE).read_text())
    assert written.memory is not None and written.memory.gpu_bytes == 80 * GIB


@pytest.mark.parametrize("gib", ["0.5", "-3"])
def test_cli_gpu_memory_that_fits_nothing_exits_2_and_writes_nothing(tmp_path, capsys, gib):
    _artifact(tmp_path)
    assert main(["build", str(tmp_path), "--dry-run", f"--gpu-memory={gib}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gpu-memory" in err
    assert not (tmp_path / PLAN_FILE).exists()


def test_gpu_memory_without_dry_run_is_refused(tmp_path, capsys):
    _artifact(tmp_path)
    assert main(["build", str(tmp_path), "--gpu-memory", "80"]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_negative_gpu_memory_is_an_input_error(tmp_path):
    manifest = _artifact(tmp_path)
    with pytest.raises(InputError, match="positive"):
        memory_plan(make_plan(manifest, SIDES), manifest.model, tmp_path, -1)
