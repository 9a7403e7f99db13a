"""Export validation: ONNX Runtime (CPU) against the torch module on representative layouts.

fp32 graphs must agree with torch to ``FP32_TOLERANCE`` of the output's scale; fp16/bf16 figures are reported
against the fp32 torch reference (bf16 graphs are checked through torch when ONNX Runtime's CPU provider lacks
bf16 kernels). Each graph also runs at two different sequence lengths, which proves no dimension was baked in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from uniref_deploy.runtime.compare import CompareResult, compare

logger = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4
REPORTED_TOLERANCE = {"fp32": FP32_TOLERANCE, "fp16": 2e-2, "bf16": 8e-2}


@dataclass
class ValidationRow:
    """One (graph, precision, sample) comparison."""

    graph: str
    precision: str
    sample: str
    engine: str  # "onnxruntime-cpu" or "torch" (bf16 fallback)
    result: CompareResult
    seconds: float
    shapes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"graph": self.graph, "precision": self.precision, "sample": self.sample, "engine": self.engine,
                "seconds": round(self.seconds, 3), "shapes": self.shapes, **self.result.to_dict()}


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def torch_outputs(module: torch.nn.Module, feeds: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names]
    return module(*args).float().numpy()


def validate_graph(graph: str, precision: str, path: Path, reference: torch.nn.Module,
                   samples: list[tuple[str, dict[str, np.ndarray]]], input_names: list[str],
                   fallback: Callable[[], torch.nn.Module] | None = None) -> list[ValidationRow]:
    """Compare the ONNX graph at ``path`` with the fp32 torch ``reference`` on every sample."""
    rows: list[ValidationRow] = []
    session, engine = None, "onnxruntime-cpu"
    try:
        session = ort_session(path)
    except Exception as err:  # e.g. no bf16 kernels on the CPU provider
        if fallback is None:
            raise
        logger.info("%s %s: ONNX Runtime cannot run it (%s); validating the torch module instead",
                    graph, precision, str(err).splitlines()[0])
        engine = "torch"
    lowp = fallback() if session is None and fallback is not None else None
    tol = REPORTED_TOLERANCE[precision]
    for label, feeds in samples:
        expected = torch_outputs(reference, feeds, input_names)
        t0 = time.perf_counter()
        if session is not None:
            actual = session.run(None, {n: feeds[n] for n in input_names})[0]
        else:
            actual = torch_outputs(lowp, feeds, input_names)
        seconds = time.perf_counter() - t0
        shapes = {n: list(feeds[n].shape) for n in input_names}
        result = compare(f"{graph}.{precision}", actual, expected, tol)
        rows.append(ValidationRow(graph, precision, label, engine, result, seconds, shapes))
        logger.info("%s %-5s %-40s %s", graph, precision, label, result.describe())
    return rows


def format_table(rows: list[ValidationRow]) -> str:
    """Plain-text table of validation rows."""
    head = f"{'graph':<12} {'prec':<5} {'engine':<16} {'sample':<42} {'rel_max':>9} {'cosine':>9} {'tol':>7} {'':>4}"
    lines = [head, "-" * len(head)]
    for r in rows:
        res = r.result
        lines.append(f"{r.graph:<12} {r.precision:<5} {r.engine:<16} {r.sample:<42} {res.rel_max:>9.2e} "
                     f"{res.cosine:>9.6f} {res.tolerance:>7.0e} {'ok' if res else 'FAIL':>4}")
    return "\n".join(lines)
