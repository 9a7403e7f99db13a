"""`uniref-deploy inspect` on the tiny artifacts: text summary and JSON."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")

from uniref_deploy.tools.cli import main  # noqa: E402


def test_inspect_text_lists_graphs_and_buckets(tiny_artifacts, capsys):
    assert main(["inspect", str(tiny_artifacts)]) == 0
    out = capsys.readouterr().out
    for word in ("graphs:", "dit", "vae_encoder", "vae_decoder", "img_tokens", "buckets:", "1024^2", "engines:",
                 "validation:", "stages:", "engine plan"):
        assert word in out


def test_inspect_json_is_valid_and_complete(tiny_artifacts, capsys):
    assert main(["inspect", str(tiny_artifacts), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {g["name"] for g in info["graphs"]} == {"dit", "vae_encoder", "vae_decoder"}
    assert {g["precision"] for g in info["graphs"]} >= {"fp32"}
    dit = next(g for g in info["graphs"] if g["name"] == "dit")
    assert dit["bytes"] > 0 and dit["present"]
    hidden = next(s for s in dit["inputs"] if s["name"] == "hidden_states")
    assert "img_tokens" in hidden["dynamic_axes"].values()
    assert info["buckets"] == [{"side": 1024, "pixels": 1024 * 1024, "max_image_tokens": 8192}]
    assert {"engines", "validation", "calibration", "stages", "engine_plan"} <= set(info)
    assert any(s["stage"] == "export" for s in info["stages"])


def test_inspect_not_an_artifact_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error:")
