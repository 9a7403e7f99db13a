"""Calling ``uniref_edit`` with Triton's own client (``tritonclient``), over HTTP or gRPC.

    client = EditClient("127.0.0.1:8000", protocol="http")
    result = client.edit("make it blue", [open("a.png", "rb").read()], steps=28, seed=0)
    open("out.png", "wb").write(result.png)

Server-side errors (bad input) raise ``EditRequestError`` with the server's one-line message.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from uniref_deploy.runtime.errors import MissingDependencyError, UnirefError
from uniref_deploy.tools.serving.interface import INPUTS, MODEL_NAME, budget_value

PROTOCOLS = ("http", "grpc")
_NUMPY = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "STRING": object}


class EditRequestError(UnirefError):
    """The server answered a request with an error (its message is the server's)."""


@dataclass(frozen=True)
class EditResult:
    """One served edit: the PNG bytes and the server's seconds per stage."""

    png: bytes
    timings: dict


class EditClient:
    """A ``tritonclient`` HTTP or gRPC client for ``uniref_edit`` (one per thread).

    Args:
        url (str): ``host:port`` of the HTTP or gRPC endpoint.
        protocol (str): ``http`` (default) or ``grpc``.
        timeout_s (float): network timeout per call (default 600).
    """

    def __init__(self, url: str, protocol: str = "http", timeout_s: float = 600.0):
        if protocol not in PROTOCOLS:
            raise EditRequestError(f"Unknown protocol '{protocol}'.", "use http or grpc.")
        try:
            self.lib = importlib.import_module(f"tritonclient.{protocol}")
        except ImportError as err:
            raise MissingDependencyError(f"tritonclient[{protocol}] is not installed ({err}).",
                                         "pip install 'uniref-deploy[serve]'.") from err
        self.protocol, self.timeout_s = protocol, timeout_s
        if protocol == "http":
            self.client = self.lib.InferenceServerClient(url, network_timeout=timeout_s, connection_timeout=timeout_s)
        else:
            self.client = self.lib.InferenceServerClient(url)

    def edit(self, prompt: str | None, images: Sequence[bytes] = (), **options) -> EditResult:
        """Send one edit. ``options``: negative_prompt, steps, true_cfg_scale, seed, budget, policy, width, height.
        ``budget`` is a :class:`Budget` or an int read as the CLI's ``--budget`` (a side up to 8192, else pixels).

        Raises:
            EditRequestError: the server refused the request (its message) or could not be reached.
        """
        inputs = self.inputs(prompt, images, **options)
        outputs = [self.lib.InferRequestedOutput(n) for n in ("image", "timings")]
        kwargs = {"timeout": int(self.timeout_s)} if self.protocol == "http" else {"client_timeout": self.timeout_s}
        try:
            res = self.client.infer(MODEL_NAME, inputs, outputs=outputs, **kwargs)
        except Exception as err:  # tritonclient's InferenceServerException and transport errors
            message = err.message() if hasattr(err, "message") and callable(err.message) else str(err)
            raise EditRequestError(str(message).strip()) from None
        return EditResult(png=bytes(res.as_numpy("image").reshape(-1)[0]),
                          timings=json.loads(res.as_numpy("timings").reshape(-1)[0]))

    def inputs(self, prompt: str | None, images: Sequence[bytes] = (), **options) -> list:
        """The ``InferInput`` list of one request (inputs left at None are omitted)."""
        specs = {s.name: s for s in INPUTS}
        values = {"prompt": prompt, **options}
        if values.get("budget") is not None:
            values["budget"] = budget_value(values["budget"])
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise EditRequestError(f"Unknown option(s) {unknown}.", f"use {sorted(specs)}.")
        tensors = {n: self._scalar(n, v, specs[n].dtype) for n, v in values.items() if v is not None}
        if images:
            tensors["images"] = np.array([[bytes(b) for b in images]], dtype=object)
        out = []
        for name, arr in tensors.items():
            inp = self.lib.InferInput(name, list(arr.shape), "BYTES" if arr.dtype == object else _triton_type(arr))
            inp.set_data_from_numpy(arr)
            out.append(inp)
        return out

    def ready(self) -> bool:
        try:
            return bool(self.client.is_model_ready(MODEL_NAME))
        except Exception:
            return False

    def close(self) -> None:
        self.client.close()

    @staticmethod
    def _scalar(name: str, value, dtype: str) -> np.ndarray:
        if dtype == "STRING":
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            return np.array([[data]], dtype=object)
        return np.array([[value]], dtype=_NUMPY[dtype])


def _triton_type(arr: np.ndarray) -> str:
    return {np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32",
            np.dtype(np.float64): "FP64"}[arr.dtype]
