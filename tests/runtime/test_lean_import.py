"""The runtime is lean: importing it (pipeline, packing, RoPE, scheduler, the ORT/TRT backends) loads no torch,
diffusers, transformers, onnxruntime or tensorrt. Checked in a fresh interpreter, since this test process has
most of them loaded already."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "onnxruntime", "tensorrt")
MODULES = (
    "uniref_deploy.runtime",
    "uniref_deploy.runtime.pipeline",
    "uniref_deploy.runtime.packing",
    "uniref_deploy.runtime.rope",
    "uniref_deploy.runtime.scheduler",
    "uniref_deploy.runtime.backends.ort",
    "uniref_deploy.runtime.backends.trt",
    "uniref_deploy.runtime.backends.openvino",
    "uniref_deploy.runtime.backends.openvino_precision",
    "uniref_deploy.runtime.cpu",
    "uniref_deploy.runtime.text_onnx",
    "uniref_deploy.runtime.text_runners",
)

PROBE = """
import importlib, json, sys
modules, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in modules:
    importlib.import_module(name)
import uniref_deploy.runtime as runtime
runtime.Pipeline  # the lazily resolved attribute
loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
print(json.dumps({"heavy": loaded, "imported": [m for m in modules if m in sys.modules]}))
"""


def _probe(modules, heavy=HEAVY) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(modules)), json.dumps(list(heavy))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runtime_imports_no_heavy_library():
    result = _probe(MODULES)
    assert result["imported"] == list(MODULES)
    assert result["heavy"] == [], f"importing the runtime loaded {result['heavy']}"


def test_probe_sees_heavy_imports():
    """Control: the probe reports a module exactly when something imports it (stdlib ``wave`` stands in)."""
    assert _probe((*MODULES, "wave"), heavy=("wave",))["heavy"] == ["wave"]
    assert _probe(MODULES, heavy=("wave",))["heavy"] == []
