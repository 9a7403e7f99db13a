"""ONNX Runtime backend: one InferenceSession per graph, IO binding, CPU (or CUDA when present).

Graph files and their external data are checked against the manifest's sha256 when the factory creates the
backends (a pipeline's load), so a damaged or swapped artifact is refused with a clear message before any compute
instead of producing garbage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .._lazy import require
from ..errors import BackendError, ManifestError
from ..graphs import GRAPH_NAMES, VAE_DECODER, VAE_ENCODER
from ..manifest import ORT_VARIANT, GraphSpec, Manifest, ModelConfig, verify_graph
from .base import Backend

TEXT_MASK = "encoder_hidden_states_mask"


def _ort():
    return require("onnxruntime", extra="onnx")


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then CPU."""
    available = _ort().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtBackend(Backend):
    """One exported graph in an ONNX Runtime session.

    Args:
        graph: the manifest entry of the graph.
        art_dir: the artifact folder holding ``graph.file``.
        providers: execution providers (default: CUDA when available, else CPU).
        threads: intra-op threads (default: ONNX Runtime's choice).
        verify: check the sha256 of the file and of its external data against the manifest before loading.
        optimization: "all" (ORT_ENABLE_ALL, fusions included), "extended", "basic" or "disabled".
        profile_prefix: when set, ONNX Runtime's profiler is on and writes its JSON trace to
            ``<profile_prefix>_<date>.json`` (returned by ``end_profiling``); default None (off).
    """

    kind = "ort"

    def __init__(self, graph: GraphSpec, art_dir: str | os.PathLike, providers: list[str] | None = None,
                 threads: int | None = None, verify: bool = True, optimization: str = "all",
                 profile_prefix: str | None = None):
        super().__init__(graph.name, graph.inputs, graph.outputs)
        self.graph, self.art_dir, self.path = graph, Path(art_dir), Path(art_dir) / graph.file
        self.providers, self.threads, self.verify, self.optimization = providers, threads, verify, optimization
        self.profile_prefix = profile_prefix
        self.session: Any = None  # onnxruntime.InferenceSession while active
        self.verified = False

    def check_files(self) -> None:
        """Hash the graph and its external data (streamed) against the manifest, once.

        Raises:
            ManifestError: a file is missing, or damaged or replaced since the export.
        """
        if not self.verified:
            verify_graph(self.art_dir, self.graph)
            self.verified = True

    def _activate(self) -> None:
        ort = _ort()
        if not self.path.is_file():
            raise ManifestError(f"Graph file '{self.path}' is missing.", "re-run `uniref-deploy export`.")
        if self.verify:
            self.check_files()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[self.optimization]
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        if self.profile_prefix:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(self.profile_prefix)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=self.providers or default_providers())
        except Exception as err:  # onnxruntime raises its own exception types
            raise BackendError(f"ONNX Runtime cannot load '{self.path}': {err}".splitlines()[0],
                               "the file may be damaged; re-run the export.") from err
        self._binding = self.session.io_binding()
        self._device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"

    def _deactivate(self) -> None:
        self.session = None
        self._binding = None

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.graph.info.get("ignores_text_mask") and not np.all(feeds.get(TEXT_MASK, True)):
            raise BackendError(
                f"Graph '{self.graph.file}' runs attention without the text mask, but this call pads the text.",
                "trim the padding (the Pipeline does) or load the portable graph with fused=False.",
            )
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for spec in self.outputs:
            binding.bind_output(spec.name, self._device)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as err:
            raise BackendError(f"ONNX Runtime failed on graph '{self.name}': {err}".splitlines()[0]) from err
        return dict(zip([s.name for s in self.outputs], binding.copy_outputs_to_cpu(), strict=True))

    def end_profiling(self) -> str | None:
        """Stop ONNX Runtime's profiler; returns its JSON trace path (None when profiling is off or inactive)."""
        if self.session is None or not self.profile_prefix:
            return None
        return self.session.end_profiling()


class OrtBackendFactory:
    """Builds the three ORT backends from an artifact folder; VAE graphs fall back to fp32 if absent.

    ``fused`` (default True) picks a graph's ``ort`` variant (ONNX Runtime contrib-op fusions, see
    ``export/ort_fusions.py``) when the manifest has one that passed its export validation; False always runs the
    portable graph.
    """

    @staticmethod
    def create(config: ModelConfig, art_dir: str | os.PathLike, manifest: Manifest | None = None,
               precision: str | None = None, fused: bool = True, **options) -> dict[str, Backend]:
        manifest = manifest or Manifest.load(art_dir)
        precision = precision or "fp32"
        backends: dict[str, Backend] = {}
        for name in GRAPH_NAMES:
            p = precision
            if name in (VAE_ENCODER, VAE_DECODER) and not manifest.has_graph(name, precision):
                p = "fp32"
            has_fused = fused and manifest.has_graph(name, p, ORT_VARIANT)
            variant = ORT_VARIANT if has_fused and manifest.graph(name, p, ORT_VARIANT).validated else ""
            backend = OrtBackend(manifest.graph(name, p, variant), art_dir, **options)
            if backend.verify:
                backend.check_files()  # every graph at load, not lazily after the denoise loop
            backends[name] = backend
        return backends
