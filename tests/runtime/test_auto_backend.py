"""``backend="auto"``: the rule of ``runtime/backends/auto.py`` for each kind of machine (availability faked)."""

from __future__ import annotations

import dataclasses

import pytest

from uniref_deploy.runtime.backends import auto, openvino
from uniref_deploy.runtime.manifest import EngineSpec, Manifest, ModelConfig

MANIFEST = Manifest(ModelConfig("qwen-image", {}, {}, {}))
WITH_ENGINES = dataclasses.replace(MANIFEST, engines=(EngineSpec("dit", 1024**2, "fp16", "engines/dit.plan", "0"),))


@pytest.mark.parametrize(("installed", "cuda", "bf16", "manifest", "expected"), [
    ({"tensorrt", "onnxruntime", "openvino"}, True, True, WITH_ENGINES, "trt"),
    ({"onnxruntime", "openvino"}, True, True, WITH_ENGINES, "ort"),  # engines but no TensorRT: ORT on CUDA
    ({"onnxruntime", "openvino"}, False, True, MANIFEST, "openvino"),  # CPU with native bf16
    ({"onnxruntime", "openvino"}, False, False, MANIFEST, "ort"),  # CPU without bf16
    ({"openvino"}, False, False, MANIFEST, "openvino"),  # an [openvino]-only install
    ({"onnxruntime"}, False, True, MANIFEST, "ort"),
])
def test_auto_rule(monkeypatch, installed, cuda, bf16, manifest, expected) -> None:
    monkeypatch.setattr(auto, "is_available", lambda name: name in installed)
    monkeypatch.setattr(auto, "_ort_has_cuda", lambda: cuda and "onnxruntime" in installed)
    monkeypatch.setattr(openvino, "native_bf16", lambda device="CPU": bf16)
    assert auto.choose_backend(manifest) == expected
