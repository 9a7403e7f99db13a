"""The ``uniref_edit`` model for Triton's Python backend: one ``Pipeline`` per model instance.

A repository's ``model.py`` re-exports ``EditModel`` as ``TritonPythonModel``. Triton runs every instance in its
own stub process, so each instance has its own pipeline, backend sessions (on a GPU: its own execution contexts)
and caches (VAE latents of references, LRU by content); nothing is shared between instances, so nothing needs a
lock. Triton queues requests and hands each to a free instance.

Bad input becomes a per-request Triton error carrying the project's one-line message; nothing is logged for it.
Only an unexpected exception (a bug) is logged, with its traceback, and answered with a one-line error.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from uniref_deploy.runtime.errors import UnirefError
from uniref_deploy.tools.serving.interface import RequestLimits, encode_png, parse_request, timings_json

logger = logging.getLogger(__name__)


def model_parameters(model_config: dict) -> dict[str, str]:
    """The ``parameters`` map of a parsed config.pbtxt (JSON form, as Triton passes it) as plain strings."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


class EditModel:
    """Triton Python-backend model: ``initialize`` loads the pipeline, ``execute`` answers each request."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils  # only importable inside Triton's stub process

        from uniref_deploy.runtime.pipeline import Pipeline

        self.pb = pb_utils
        params = model_parameters(json.loads(args["model_config"]))
        self.limits = RequestLimits(max_references=int(params["max_references"]),
                                    max_request_bytes=int(float(params["max_request_mb"]) * 2**20))
        if args.get("model_instance_kind") == "GPU":
            # one stub process per instance: make its GPU the only one it sees, before any CUDA work
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args["model_instance_device_id"])
        self.pipe = Pipeline.from_artifacts(params["artifacts"], backend=params.get("backend") or "auto",
                                            precision=params.get("precision") or None)
        logger.info("%s: pipeline ready (%s)", args.get("model_instance_name"), params["artifacts"])

    def execute(self, requests: list) -> list:
        return [self._answer(r) for r in requests]

    def finalize(self) -> None:
        self.pipe.close()

    def _answer(self, request):
        pb = self.pb
        try:
            tensors = {t.name(): t.as_numpy() for t in request.inputs()}
            image = self.pipe(**parse_request(tensors, self.limits))
            outputs = [pb.Tensor("image", np.array([[encode_png(image)]], dtype=object)),
                       pb.Tensor("timings", np.array([[timings_json(self.pipe.last_times)]], dtype=object))]
            return pb.InferenceResponse(output_tensors=outputs)
        except UnirefError as err:
            return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(err)))
        except Exception as err:  # a bug, not bad input: keep serving, say so in one line, log the traceback
            logger.exception("uniref_edit failed on a request")
            return pb.InferenceResponse(output_tensors=[],
                                        error=pb.TritonError(f"Internal error: {type(err).__name__}: {err}"))
