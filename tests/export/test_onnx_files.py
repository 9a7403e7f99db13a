"""Graphs with external data: saved under their final names, moved with their data re-pointed, and rewritten in
place by a LoRA swap without losing their weights (real ONNX Runtime sessions read every result)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from uniref_deploy.export import onnx_files
from uniref_deploy.export.onnx_files import data_file, move_graph, save_graph

ort = pytest.importorskip("onnxruntime")


def _matmul(value: float) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.full((64, 64), value, np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(path: Path) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float(session.run(None, {"x": np.ones((1, 64), np.float32)})[0][0, 0])


def test_save_graph_external_and_inline(tmp_path: Path) -> None:
    path = tmp_path / "g.onnx"
    save_graph(_matmul(1.0), path, external=True)
    assert data_file(path).is_file() and path.stat().st_size < 4096
    assert _run(path) == 64.0
    save_graph(_matmul(2.0), path, external=False)  # inline now: the stale data file goes
    assert not data_file(path).exists() and _run(path) == 128.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]  # no temporary left


def test_save_graph_goes_external_near_the_protobuf_limit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", 1024)
    save_graph(_matmul(1.0), tmp_path / "g.onnx")
    assert data_file(tmp_path / "g.onnx").is_file()


def test_move_graph_repoints_its_data(tmp_path: Path) -> None:
    src, dst = tmp_path / "a" / "cand.onnx", tmp_path / "b" / "dit.int8.onnx"
    save_graph(_matmul(3.0), src, external=True)
    move_graph(src, dst)
    assert not src.exists() and not data_file(src).exists()
    assert data_file(dst).is_file() and _run(dst) == 192.0
    locations = {e.value for t in onnx.load(str(dst), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"dit.int8.onnx.data"}


def test_lora_rewrite_keeps_external_data_loadable(tmp_path: Path) -> None:
    from uniref_deploy.export.lora_swap import _rewrite

    path = tmp_path / "dit.onnx"
    save_graph(_matmul(1.0), path, external=True)
    _rewrite(path, {"w": (np.full((64, 64), 0.5, np.float32), False)})
    assert data_file(path).is_file() and _run(path) == 32.0
