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


def test_budgets_are_pixels_on_disk_and_budgets_in_memory(tmp_path: Path) -> None:
    from uniref_deploy.runtime.budget import Budget
    from uniref_deploy.runtime.manifest import EngineSpec

    engine = EngineSpec("dit", "fp16", "engines/dit.fp16.plan", "0" * 64, (1024 * 1024,))
    manifest = Manifest(ModelConfig("qwen-image", {}, {}, {}), engines=(engine,)).with_budgets((1536, 1024 * 1024))
    manifest.save(tmp_path)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["schema_version"] == 2 and raw["budgets"] == [1024 * 1024, 1536 * 1536]
    assert raw["engines"][0]["budgets"] == [1024 * 1024]
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest and loaded.largest_budget == Budget.from_side(1536)


def test_schema_1_manifests_are_migrated_on_load(tmp_path: Path) -> None:
    """v1 could hold per-bucket engine records (``budget``, a side): they are dropped (``build`` remakes them as one
    engine per precision); records of the per-precision layout and the budgets are kept."""
    per_precision = {"graph": "vae_decoder", "precision": "fp16", "file": "engines/vae_decoder.fp16.plan",
                     "sha256": "1" * 64, "budgets": [1024 * 1024]}
    v1 = {"schema_version": 1, "model": {"family": "qwen-image", "transformer": {}, "vae": {}, "scheduler": {}},
          "budgets": [1024 * 1024], "graphs": [], "stages": [],
          "engines": [{"graph": "dit", "budget": 1024, "precision": "fp16", "file": "engines/dit.b1024.fp16.plan",
                       "sha256": "0" * 64}, per_precision]}
    (tmp_path / "manifest.json").write_text(json.dumps(v1))
    loaded = Manifest.load(tmp_path)
    assert loaded.schema_version == 2
    assert [(e.graph, e.budgets) for e in loaded.engines] == [("vae_decoder", (1024 * 1024,))]
    assert [b.pixels for b in loaded.budgets] == [1024 * 1024]


def test_unknown_schema_versions_are_refused() -> None:
    with pytest.raises(ManifestError, match="schema version 99"):
        Manifest.from_dict({"schema_version": 99, "model": {}})


def test_text_encoder_dir_is_stored_relative_so_artifacts_can_move(tmp_path: Path) -> None:
    source, art = tmp_path / "project" / "models" / "edit", tmp_path / "project" / "runs" / "art"
    source.mkdir(parents=True)
    art.mkdir(parents=True)
    Manifest(ModelConfig("qwen-image", {}, {}, {}, str(source))).save(art)
    assert json.loads((art / "manifest.json").read_text())["model"]["text_encoder_dir"] == "../../models/edit"
    assert Manifest.load(art).model.text_encoder_dir == str(source.resolve())
    (tmp_path / "project").rename(tmp_path / "moved")  # model and artifacts move together: still found
    loaded = Manifest.load(tmp_path / "moved" / "runs" / "art")
    assert loaded.model.text_encoder_dir == str((tmp_path / "moved" / "models" / "edit").resolve())
