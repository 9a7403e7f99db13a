"""`export` / `compile --text-graphs/--no-text-graphs` reach the exporter (on by default)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from uniref_deploy.runtime.manifest import Manifest, ModelConfig
from uniref_deploy.tools.cli import main


@pytest.fixture
def captured(monkeypatch) -> list:
    """Replace the export itself: record the ExportOptions each CLI call passes."""
    import uniref_deploy.export.exporter as exporter

    seen: list = []

    def fake_export(model_dir, art_dir, options, progress=None):
        seen.append(options)
        return Manifest(ModelConfig("qwen-image", {}, {}, {}))

    monkeypatch.setattr(exporter, "export_onnx", fake_export)
    return seen


@pytest.mark.parametrize(("flags", "expected"), [([], True), (["--no-text-graphs"], False), (["--text-graphs"], True)])
def test_export_text_graphs_flag(tiny_model_dir: Path, tmp_path: Path, captured: list, flags, expected):
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path / "art"), "--no-lean", *flags]) == 0
    assert [o.text_graphs for o in captured] == [expected]


def test_compile_passes_no_text_graphs(tiny_model_dir: Path, tmp_path: Path, captured: list):
    with contextlib.suppress(Exception):  # the later stages need real graphs; only the export call matters here
        main(["compile", str(tiny_model_dir), "--out", str(tmp_path / "art"), "--no-text-graphs", "--budgets", "1024"])
    assert captured and captured[0].text_graphs is False
