"""OpenVINO backend: the artifact's portable ONNX graphs compiled for the CPU, f32 or bf16 per graph.

OpenVINO reads ``onnx/*.onnx`` unchanged (dynamic axes stay dynamic). Its inference-precision hint runs a graph's
matmuls and convolutions in bf16 where the CPU has native bf16 (AMX or AVX-512 BF16); which graphs may use it is
decided by measured accuracy (``openvino_precision.py``, recorded in the manifest), since bf16 ruins some graphs
(a randomly initialised VAE) while the DiT keeps the bf16 level of error. In bf16, sinusoids of graph inputs (the
DiT's timestep projection) run in an f32 pre-model (``openvino_islands.py``), as diffusers keeps them in fp32. Compiled models are cached in
``ART/cache/openvino`` so a second start skips compilation. Needs ``pip install 'uniref-deploy[openvino]'``, no torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._lazy import require
from ..errors import BackendError, InputError, ManifestError
from ..graphs import DIT, GRAPH_NAMES
from ..manifest import GraphSpec, Manifest, ModelConfig, verify_graph
from .base import Backend
from .openvino_islands import IslandSplit, split_f32_islands

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
INFERENCE_HINTS = {"fp32": "f32", "bf16": "bf16"}  # our precision name -> OpenVINO's inference precision
CACHE_DIR = Path("cache") / "openvino"


def _ov():
    return require("openvino", extra="openvino")


def native_bf16(device: str = "CPU") -> bool:
    """True when OpenVINO reports bf16 among the device's optimisation capabilities (AMX / AVX-512 BF16)."""
    return "BF16" in _ov().Core().get_property(device, "OPTIMIZATION_CAPABILITIES")


class OpenVinoBackend(Backend):
    """One exported graph compiled by OpenVINO.

    Args:
        graph: the manifest entry of the graph (its portable ONNX file).
        art_dir: the artifact folder holding ``graph.file``.
        inference_precision: "fp32" or "bf16": OpenVINO's ``INFERENCE_PRECISION_HINT`` for this graph.
        threads: inference threads (default: OpenVINO's choice, one per physical core).
        cache_dir: folder for OpenVINO's compiled-model cache, or None for no cache.
        verify: check the file's sha256 against the manifest before compiling.
        device: OpenVINO device name; default "CPU".
    """

    kind = "openvino"

    def __init__(self, graph: GraphSpec, art_dir: str | os.PathLike, inference_precision: str = "fp32",
                 threads: int | None = None, cache_dir: str | os.PathLike | None = None, verify: bool = True,
                 device: str = "CPU"):
        super().__init__(graph.name, graph.inputs, graph.outputs)
        if inference_precision not in INFERENCE_HINTS:
            raise InputError(f"OpenVINO inference precision '{inference_precision}' is not supported.",
                             f"use one of {', '.join(INFERENCE_HINTS)}.")
        self.graph, self.art_dir, self.path = graph, Path(art_dir), Path(art_dir) / graph.file
        self.inference_precision, self.threads, self.verify, self.device = inference_precision, threads, verify, device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.compiled: Any = None  # openvino.CompiledModel once active
        self._request: Any = None
        self.islands: IslandSplit | None = None  # bf16: the f32 islands split off the graph (openvino_islands.py)
        self._pre: Any = None  # an infer request of their compiled f32 pre-model, when there are any
        self._ports: dict[str, Any] = {}

    def compile_config(self) -> dict[str, str]:
        """The properties passed to ``Core.compile_model``."""
        config = {"INFERENCE_PRECISION_HINT": INFERENCE_HINTS[self.inference_precision],
                  "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = str(int(self.threads))
        if self.cache_dir is not None:
            config["CACHE_DIR"] = str(self.cache_dir)
        return config

    def _activate(self) -> None:
        ov = _ov()
        if not self.path.is_file():
            raise ManifestError(f"Graph file '{self.path}' is missing.", "re-run `uniref-deploy export`.")
        if self.verify:
            verify_graph(self.art_dir, self.graph)  # the graph and its external data (streamed)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            compiled = self._compile(ov.Core())
        except Exception as err:  # OpenVINO raises RuntimeError with a multi-line message
            raise BackendError(f"OpenVINO cannot compile '{self.path}': {err}".splitlines()[0],
                               "the file may be damaged; re-run the export.") from err
        self.compiled, self._request = compiled, compiled.create_infer_request()
        self._ports = {s.name: compiled.output(s.name) for s in self.outputs}

    def _compile(self, core: Any) -> Any:
        """Compile the graph; in bf16, its f32 islands first go to an f32 pre-model (``self._pre``)."""
        config = self.compile_config()
        if self.inference_precision != "bf16":
            return core.compile_model(str(self.path), self.device, config)
        split = split_f32_islands(core.read_model(str(self.path)))
        if split.pre is not None:
            pre = core.compile_model(split.pre, self.device, {**config, "INFERENCE_PRECISION_HINT": "f32"})
            self._pre = pre.create_infer_request()
        compiled = core.compile_model(split.main, self.device, config)
        self.islands = split.without_models()
        return compiled

    def _deactivate(self) -> None:
        self._request = None
        self.compiled = None
        self._pre = None
        self.islands = None

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        try:
            if self._pre is not None and self.islands is not None:
                pre = self._pre.infer({k: feeds[k] for k in self.islands.pre_inputs}, share_outputs=False)
                feeds.update({port.get_any_name(): np.asarray(value) for port, value in pre.items()})
                feeds = {k: feeds[k] for k in self.islands.main_inputs}
            out = self._request.infer(feeds, share_outputs=False)
        except Exception as err:
            raise BackendError(f"OpenVINO failed on graph '{self.name}': {err}".splitlines()[0]) from err
        return {name: np.asarray(out[port], dtype=np.float32) for name, port in self._ports.items()}


class OpenVinoBackendFactory:
    """Builds one OpenVINO backend per graph of an artifact folder.

    ``precision`` (the DiT's, as for the other backends):
        None: every graph at its measured precision (bf16 where the CPU has native bf16 and the graph keeps
            its accuracy, else f32), measured once and recorded in the manifest;
        "fp32": every graph in f32;
        "bf16": the DiT in bf16 (the VAE graphs at their measured precision);
        "int8": the DiT's INT8 graph (``dit.int8``, from ``calibrate --precision int8``), the rest measured.
    Options: ``threads`` (int), ``cache`` (bool, default True: compiled models in ``ART/cache/openvino``),
    ``verify`` (bool), ``device`` (str, default "CPU").
    """

    @staticmethod
    def create(config: ModelConfig, art_dir: str | os.PathLike, manifest: Manifest | None = None,
               precision: str | None = None, threads: int | None = None, cache: bool = True, verify: bool = True,
               device: str = "CPU") -> dict[str, Backend]:
        from .openvino_precision import graph_precisions

        if precision is not None and precision not in PRECISIONS:
            raise InputError(f"The openvino backend has no precision '{precision}'.",
                             f"use one of {', '.join(PRECISIONS)}, or none for the measured choice per graph.")
        art_dir = Path(art_dir)
        manifest = manifest or Manifest.load(art_dir)
        graphs = {name: manifest.graph(name, "int8" if (name == DIT and precision == "int8") else "fp32")
                  for name in GRAPH_NAMES}
        if verify:  # every graph and its external data at load, before the precision probe runs any of them
            for graph in graphs.values():
                verify_graph(art_dir, graph)
        cache_dir = model_cache_dir(art_dir) if cache else None
        hints = graph_precisions(manifest, art_dir, precision, threads=threads, device=device, cache_dir=cache_dir)
        backends: dict[str, Backend] = {}
        for name, graph in graphs.items():
            backends[name] = OpenVinoBackend(graph, art_dir, hints[name], threads=threads, cache_dir=cache_dir,
                                             verify=verify, device=device)
        return backends


def model_cache_dir(art_dir: Path) -> Path | None:
    """``ART/cache/openvino`` when the artifact folder is writable, else None (compile every start)."""
    path = art_dir / CACHE_DIR
    if os.access(path if path.is_dir() else art_dir, os.W_OK):
        return path
    logger.warning("artifact folder %s is read-only: OpenVINO compiles every start (no model cache)", art_dir)
    return None
