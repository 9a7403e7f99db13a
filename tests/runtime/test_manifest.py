"""Manifest graph variants: the portable graph and its ONNX Runtime-fused copy side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uniref_deploy.runtime.errors import ManifestError
from uniref_deploy.runtime.manifest import GraphSpec, Manifest, ModelConfig, TensorSpec

IO = (TensorSpec("x", "float32", ("batch", 4)),), (TensorSpec("y", "float32", ("batch", 4)),)


def _graph(variant: str = "") -> GraphSpec:
    return GraphSpec("dit", "fp32", f"onnx/dit{'.' + variant if variant else ''}.onnx", "0" * 64, *IO,
                     variant=variant)


def test_variants_are_separate_entries(tmp_path: Path) -> None:
    manifest = Manifest(ModelConfig("qwen-image", {"in_channels": 4}, {}, {})).with_graph(_graph()).with_graph(_graph("ort"))
    assert [g.key for g in manifest.graphs] == ["dit.fp32", "dit.fp32.ort"]
    assert manifest.graph("dit").file == "onnx/dit.onnx"
    assert manifest.graph("dit", "fp32", "ort").file == "onnx/dit.ort.onnx"
    assert manifest.has_graph("dit", "fp32", "ort") and not manifest.has_graph("dit", "fp16", "ort")
    manifest.save(tmp_path)
    assert Manifest.load(tmp_path) == manifest
    portable_only = manifest.without_graph("dit.fp32.ort")
    assert [g.key for g in portable_only.graphs] == ["dit.fp32"]
    with pytest.raises(ManifestError, match="no 'dit' graph"):
        portable_only.graph("dit", "fp32", "ort")


def test_manifests_without_variant_field_load_as_portable(tmp_path: Path) -> None:
    Manifest(ModelConfig("qwen-image", {}, {}, {})).with_graph(_graph()).save(tmp_path)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    for g in raw["graphs"]:
        g.pop("variant")  # as written before variants existed
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert Manifest.load(tmp_path).graph("dit").variant == ""
