"""Graph runners for the compiled prompt encoder: (feeds -> outputs) callables over the two exported text graphs.

The ONNX Runtime session is the one runner today, whatever backend runs the DiT (the text graphs have no TensorRT
engines or OpenVINO choice yet); another backend plugs in by returning its own callables from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .backends.base import _NUMPY_DTYPES
from .backends.ort import OrtBackend
from .manifest import Manifest

__all__ = ["text_graph_runners"]

TEXT_PRECISION = "fp32"  # the exact precision; an fp16 text graph is a measured choice, not a default


def text_graph_runners(art_dir: str | os.PathLike, manifest: Manifest, backend: str = "ort",
                       precision: str = TEXT_PRECISION):
    """``runners(graph_name) -> (run, input dtypes)`` for ``CompiledPromptEncoder.from_artifacts``.

    Sessions open lazily on the first prompt and their files are hashed against the manifest first.
    """

    def runners(name: str) -> tuple[Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
                                    dict[str, np.dtype]]:
        graph = manifest.graph(name, precision)
        session = OrtBackend(graph, Path(art_dir))
        session.check_files()
        dtypes = {s.name: np.dtype(_NUMPY_DTYPES[s.dtype]) for s in graph.inputs if s.dtype in _NUMPY_DTYPES}
        return session.infer, dtypes

    return runners
