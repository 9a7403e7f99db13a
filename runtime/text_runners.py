"""Graph runners for the compiled prompt encoder: (feeds -> outputs) callables over the two exported text graphs.

The text graphs always run at fp32 (exact against transformers). ONNX Runtime runs them when it is installed;
OpenVINO runs them when the DiT runs on OpenVINO, or when it is the only runtime installed (a ``[openvino]``-only
install edits without onnxruntime or torch). TensorRT has no text runner yet: a ``trt`` pipeline encodes prompts
with ONNX Runtime.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ._lazy import is_available
from .backends.base import _NUMPY_DTYPES, Backend
from .manifest import Manifest

__all__ = ["TEXT_RUNTIMES", "text_graph_runners", "text_runtime"]

TEXT_PRECISION = "fp32"  # the exact precision; an fp16 text graph is a measured choice, not a default
TEXT_RUNTIMES = ("ort", "openvino")


def text_runtime(backend: str) -> str | None:
    """Which runtime runs the text graphs for a pipeline on ``backend``; None when none is installed."""
    have = {name: is_available(module) for name, module in (("ort", "onnxruntime"), ("openvino", "openvino"))}
    if backend == "openvino" and have["openvino"]:
        return "openvino"
    if have["ort"]:
        return "ort"
    return "openvino" if have["openvino"] else None


def text_graph_runners(art_dir: str | os.PathLike, manifest: Manifest, backend: str = "ort",
                       precision: str = TEXT_PRECISION):
    """``runners(graph_name) -> (run, input dtypes)`` for ``CompiledPromptEncoder.from_artifacts``.

    ``backend`` is the pipeline's backend; ``text_runtime`` picks the runtime. Sessions open lazily on the first
    prompt; their files are hashed against the manifest first.
    """
    runtime = text_runtime(backend) or "ort"

    def runners(name: str) -> tuple[Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
                                    dict[str, np.dtype]]:
        graph = manifest.graph(name, precision)
        session: Backend
        if runtime == "openvino":
            from .backends.openvino import OpenVinoBackend, model_cache_dir

            session = OpenVinoBackend(graph, Path(art_dir), "fp32", cache_dir=model_cache_dir(Path(art_dir)))
        else:
            from .backends.ort import OrtBackend

            ort_session = OrtBackend(graph, Path(art_dir))
            ort_session.check_files()
            session = ort_session
        dtypes = {s.name: np.dtype(_NUMPY_DTYPES[s.dtype]) for s in graph.inputs if s.dtype in _NUMPY_DTYPES}
        return session.infer, dtypes

    return runners
