"""`uniref-deploy inspect` on the tiny artifacts: the text summary mirrors the JSON, section by section."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")

from uniref_deploy.runtime.manifest import Manifest  # noqa: E402
from uniref_deploy.tools.cli import main  # noqa: E402

SECTIONS = ("graphs", "buckets", "engines", "validation", "calibration", "stages", "engine plan")


def _inspect(art, capsys, *flags) -> str:
    assert main(["inspect", str(art), *flags]) == 0
    return capsys.readouterr().out


def _section_lines(text: str, header: str) -> list[str]:
    """The indented lines under the line starting with ``header:``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{header}:"))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        body.append(line)
    return body


@pytest.mark.slow  # tiny_artifacts exports a model
def test_text_has_every_section_in_order_and_one_line_per_item(tiny_artifacts, capsys):
    info = json.loads(_inspect(tiny_artifacts, capsys, "--json"))
    text = _inspect(tiny_artifacts, capsys)
    headers = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert [h for h in headers if h in SECTIONS] == list(SECTIONS)
    graph_lines = [line for line in _section_lines(text, "graphs") if not line.startswith("      ")]
    assert len(graph_lines) == len(info["graphs"])
    for line, graph in zip(graph_lines, info["graphs"], strict=True):
        assert line.split()[:3] == [graph["name"], graph["precision"], graph["variant"]]
    assert len(_section_lines(text, "buckets")) == len(info["buckets"])
    assert len(_section_lines(text, "validation")) == len(info["validation"])
    assert len(_section_lines(text, "stages")) == len(info["stages"])


@pytest.mark.slow
def test_json_matches_the_manifest(tiny_artifacts, capsys):
    info = json.loads(_inspect(tiny_artifacts, capsys, "--json"))
    manifest = Manifest.load(tiny_artifacts)
    assert info["schema_version"] == manifest.schema_version
    assert [(g["name"], g["precision"]) for g in info["graphs"]] == [(g.name, g.precision) for g in manifest.graphs]
    assert all(g["present"] and g["bytes"] > 0 for g in info["graphs"])
    dit = next(g for g in info["graphs"] if g["name"] == "dit")
    spec = manifest.graph("dit")
    assert [s["name"] for s in dit["inputs"]] == [s.name for s in spec.inputs]
    for entry, tensor in zip(dit["inputs"], spec.inputs, strict=True):
        assert {int(k): v for k, v in entry["dynamic_axes"].items()} == tensor.dynamic_axes
    assert [(b["pixels"], b["max_image_tokens"]) for b in info["buckets"]] == [
        (b.pixels, b.max_image_tokens) for b in manifest.budgets]
    assert [s["stage"] for s in info["stages"]] == [s.stage for s in manifest.stages]
    assert isinstance(info["validation"], list) and info["engines"] == []


def test_inspect_not_an_artifact_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error:")
