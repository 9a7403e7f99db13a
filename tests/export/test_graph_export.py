"""Tests for export/graph_export.py: named dynamic axes, and a trace that pins one of them is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

import onnx  # noqa: E402

from uniref_deploy.export.graph_export import export_graph  # noqa: E402
from uniref_deploy.runtime.errors import ExportError  # noqa: E402
from uniref_deploy.runtime.manifest import TensorSpec  # noqa: E402

SPECS_IN = (TensorSpec("x", "float32", ("batch", "img_tokens", 3)),)
SPECS_OUT = (TensorSpec("y", "float32", ("batch", "img_tokens", 3)),)


class Scale(torch.nn.Module):
    def forward(self, x):
        return x * 2


class BakesBatch(Scale):
    """Reshapes with a literal batch of 2: torch.export keeps the input symbolic but the output's batch is 2."""

    def forward(self, x):
        return x.reshape(2, -1, 3) * 2


def test_dynamic_axes_are_named_and_run_at_other_sizes(tmp_path: Path) -> None:
    path = export_graph(Scale().eval(), (torch.randn(2, 5, 3),), tmp_path / "g.onnx", SPECS_IN, SPECS_OUT)
    model = onnx.load(str(path))
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*model.graph.input,
                                                                                       *model.graph.output)]
    assert dims == [["batch", "img_tokens", 3]] * 2
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.ones((1, 7, 3), np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], 2 * x)


def test_a_pinned_dynamic_axis_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"axis 0 \('batch'\) of 'y' to 2") as info:
        export_graph(BakesBatch().eval(), (torch.randn(2, 5, 3),), tmp_path / "g.onnx", SPECS_IN, SPECS_OUT)
    assert "\n" not in info.value.message
    assert not (tmp_path / "g.onnx").exists()  # nothing half-written
