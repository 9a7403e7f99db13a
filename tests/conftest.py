"""Shared pytest fixtures. Keep each group in its own section; session-scoped models are built once per run."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)


# --- model presets (presets/) -------------------------------------------------------------------------


def _build_preset_fixture(name: str, tmp_path_factory: pytest.TempPathFactory, **options) -> Path:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from uniref_deploy.presets import build_preset

    start = time.perf_counter()
    out = build_preset(name, tmp_path_factory.mktemp("presets") / name, seed=0, **options)
    logger.info("preset %s built in %.1f s", name, time.perf_counter() - start)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` preset (seed 0) in diffusers format; built once per session (~1 s after imports)."""
    return _build_preset_fixture("tiny", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_edit_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` preset (seed 0) as a ``QwenImageEditPipeline`` folder (Qwen-Image-Edit's class)."""
    return _build_preset_fixture("tiny", tmp_path_factory, pipeline_class="QwenImageEditPipeline")


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``small`` preset (seed 0, ~1 GB on disk, ~10-15 s); only built when a test requests it."""
    return _build_preset_fixture("small", tmp_path_factory)


# --- artifacts (export + compile) ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``compile tiny`` at the 1024 bucket (fp32 + fp16 graphs, validated, runtime-checked, engine plan).

    Built once per session (~2-3 min on 2 cores). Tests must not modify it: copy it first (``copy_artifacts``).
    """
    pytest.importorskip("onnxruntime")
    pytest.importorskip("diffusers")
    from uniref_deploy.tools.compile_job import compile_model

    art = tmp_path_factory.mktemp("artifacts") / "tiny"
    start = time.perf_counter()
    compile_model("tiny", art, [1024 * 1024], ["fp16"], say=lambda msg: logger.info(msg))
    logger.info("tiny artifacts compiled in %.1f s", time.perf_counter() - start)
    return art


@pytest.fixture
def copy_artifacts(tiny_artifacts: Path, tmp_path: Path):
    """A private copy of the tiny artifacts for tests that write into the folder."""
    import shutil

    def make() -> Path:
        dst = tmp_path / "art"
        shutil.copytree(tiny_artifacts, dst, symlinks=True)
        return dst

    return make


# --- the TensorRT stand-in (tests/fakes) --------------------------------------------------------------------------


@contextlib.contextmanager
def fake_tensorrt_modules() -> Iterator[types.ModuleType]:
    """Put the test-only ``tensorrt`` and ``cuda.bindings.runtime`` stand-ins (tests/fakes) in ``sys.modules``.

    They run plans with ONNX Runtime on fake device memory; results are never TensorRT results. Yields the fake
    ``tensorrt`` module (its ``fake_cudart`` sibling holds the device state). Everything is restored afterwards.
    """
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).parent / "fakes"))
        import fake_cudart
        import fake_tensorrt

        fake_cudart.reset()
        cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        cuda.__path__, bindings.__path__ = [], []  # packages, so `from cuda.bindings import runtime` resolves
        cuda.bindings, bindings.runtime = bindings, fake_cudart
        for name, module in (("tensorrt", fake_tensorrt), ("cuda", cuda), ("cuda.bindings", bindings),
                             ("cuda.bindings.runtime", fake_cudart)):
            mp.setitem(sys.modules, name, module)
        yield fake_tensorrt


@pytest.fixture
def fake_trt() -> Iterator[types.ModuleType]:
    """The TensorRT stand-in for one test (a fresh fake device)."""
    with fake_tensorrt_modules() as trt:
        yield trt


@pytest.fixture(scope="module")
def fake_trt_module() -> Iterator[types.ModuleType]:
    """The TensorRT stand-in for a whole test module (engines built once are shared by its tests)."""
    with fake_tensorrt_modules() as trt:
        yield trt
