"""`uniref-deploy lora` on an artifact with TensorRT engines: refittable engines are refitted, others go stale.

The refit runs through the TensorRT stand-in (tests/fakes): its engines run the ONNX graph in ONNX Runtime and its
``Refitter`` swaps that graph's initializers. These tests check this project's refit path (which weights are set,
records, hashes, stale engines), never TensorRT itself; ``test_real_tensorrt_refit`` does that where TensorRT is.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
ort = pytest.importorskip("onnxruntime")

from diffusers import QwenImageTransformer2DModel  # noqa: E402
from lora_factory import lora_factors, write_lora  # noqa: E402

from uniref_deploy.runtime.graphs import DIT  # noqa: E402
from uniref_deploy.runtime.manifest import Manifest  # noqa: E402
from uniref_deploy.tools.cli import main  # noqa: E402

EXPORT_FLAGS = ["--dtypes", "fp32", "--no-validate", "--no-ort-fusions"]


@pytest.fixture(scope="module")
def loras(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer")
    out = tmp_path_factory.mktemp("refit-loras")
    return (write_lora(lora_factors(transformer, seed=0, strength=3.0), out / "first.safetensors", "peft"),
            write_lora(lora_factors(transformer, seed=7, strength=3.0), out / "second.safetensors", "kohya"))


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, loras, tmp_path_factory) -> Path:
    art = tmp_path_factory.mktemp("refit") / "art"
    assert main(["export", str(tiny_model_dir), "--out", str(art), *EXPORT_FLAGS, "--lora", f"{loras[0]}:0.7"]) == 0
    return art


def _with_dit_engine(exported: Path, tmp_path: Path, refittable: bool) -> tuple[Path, Manifest]:
    """A copy of the artifact with a (stand-in) fp32 DiT engine built from its graph."""
    import shutil

    from uniref_deploy.engines.build import build_engines
    from uniref_deploy.engines.plan import PlanOptions, make_plan

    art = tmp_path / "art"
    shutil.copytree(exported, art)
    manifest = Manifest.load(art)
    plan = make_plan(manifest, manifest.budgets, ("fp32",), PlanOptions(refittable=refittable))
    plan = dataclasses.replace(plan, engines=tuple(e for e in plan.engines if e.graph == DIT))
    return art, build_engines(art, plan)


def _feeds(manifest: Manifest) -> dict[str, np.ndarray]:
    from uniref_deploy.export.samples import dit_sample
    from uniref_deploy.runtime.packing import pack_references

    layout = pack_references([(96, 64)], 128 * 96, policy="per-image", width=64, height=64)
    return dit_sample(manifest.model, layout, 9, pad=2, batch=1, seed=3).feeds


def _engine_output(art: Path, feeds: dict) -> np.ndarray:
    from uniref_deploy.runtime.backends.trt import TrtBackend

    manifest = Manifest.load(art)
    graph = manifest.graph(DIT, "fp32")
    (spec,) = [e for e in manifest.engines if e.graph == DIT]
    backend = TrtBackend(DIT, graph.inputs, graph.outputs, spec, art)
    try:
        return backend.infer({s.name: feeds[s.name] for s in graph.inputs})[graph.outputs[0].name]
    finally:
        backend.deactivate()


def _ort_output(art: Path, feeds: dict) -> np.ndarray:
    graph = Manifest.load(art).graph(DIT, "fp32")
    sess = ort.InferenceSession(str(art / graph.file), providers=["CPUExecutionProvider"])
    return sess.run(None, {s.name: feeds[s.name] for s in graph.inputs})[0]


@pytest.mark.slow
def test_swap_refits_refittable_engines(exported, loras, tmp_path, fake_trt, capsys):
    from uniref_deploy.engines.refit import refitted_plan

    art, manifest = _with_dit_engine(exported, tmp_path, refittable=True)
    (spec,) = manifest.engines
    assert spec.provenance["refittable"]
    graph = manifest.graph(DIT, "fp32")
    assert refitted_plan(spec, graph.file, graph.sha256).settings_sha256() == spec.provenance["plan_sha256"]
    feeds = _feeds(manifest)
    before = _engine_output(art, feeds)
    np.testing.assert_allclose(before, _ort_output(art, feeds), rtol=0, atol=1e-5)

    capsys.readouterr()
    refits = fake_trt.STATS["refits"]
    assert main(["lora", str(art), "--lora", f"{loras[1]}:0.5"]) == 0
    assert "refitted engines/dit.fp32.plan" in capsys.readouterr().err
    assert fake_trt.STATS["refits"] == refits + 1
    swapped = Manifest.load(art)
    swapped.verify_files(art)
    (new,) = swapped.engines
    assert new.sha256 == hashlib.sha256((art / new.file).read_bytes()).hexdigest() != spec.sha256
    new_graph = swapped.graph(DIT, "fp32")
    assert new.provenance["onnx_sha256"] == new_graph.sha256 != graph.sha256
    assert new.provenance["plan_sha256"] == refitted_plan(new, new_graph.file, new_graph.sha256).settings_sha256()

    after, expected = _engine_output(art, feeds), _ort_output(art, feeds)
    np.testing.assert_allclose(after, expected, rtol=0, atol=1e-5)  # the refitted engine computes the new graph
    assert float(np.abs(after - before).max()) > 100 * 1e-5, "the two LoRAs give the same output: test is blind"


@pytest.mark.slow
def test_swap_marks_other_engines_stale(exported, loras, tmp_path, fake_trt, capsys):
    art, manifest = _with_dit_engine(exported, tmp_path, refittable=False)
    assert len(manifest.engines) == 1
    capsys.readouterr()
    refits = fake_trt.STATS["refits"]
    assert main(["lora", str(art), "--lora", f"{loras[1]}:0.5"]) == 0
    err = capsys.readouterr().err
    assert "stale" in err and "uniref-deploy build" in err and "refitted" not in err
    assert fake_trt.STATS["refits"] == refits
    assert Manifest.load(art).engines == ()


@pytest.mark.trt
def test_real_tensorrt_refit(tmp_path):
    """A refittable engine of a one-weight graph, refitted by the real TensorRT (skips without it and a GPU)."""
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here (needs an NVIDIA GPU)")
    from uniref_deploy.engines.build import check_build_environment

    reason = check_build_environment()
    if reason is not None:
        pytest.skip(reason)
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from uniref_deploy.engines.refit import refit_engine
    from uniref_deploy.runtime.manifest import EngineSpec

    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, logger).parse_from_file(str(path))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.REFIT)
    (tmp_path / "g.plan").write_bytes(bytes(builder.build_serialized_network(network, config)))
    new_w = -w
    onnx.save(helper.make_model(helper.make_graph(graph.node, "g", graph.input, graph.output,
                                                  [numpy_helper.from_array(new_w, "w")]),
                                opset_imports=[helper.make_opsetid("", 17)]), path)
    spec = EngineSpec("dit", "fp32", "g.plan", "", (1,), {"profiles": [], "builder_optimization_level": 3,
                                                           "strongly_typed": True, "refittable": True})
    new = refit_engine(tmp_path, spec, "g.onnx", "0" * 64, ["w"])
    engine = trt.Runtime(logger).deserialize_cuda_engine((tmp_path / "g.plan").read_bytes())
    assert engine.refittable and new.provenance["refit"]["weights"] >= 1
