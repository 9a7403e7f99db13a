"""The ``uniref_edit`` model's tensors and the checks that turn one Triton request into ``Pipeline`` arguments.

Every tensor carries Triton's batch dimension first (``max_batch_size: 1``). Inputs: ``prompt`` BYTES [1];
``images`` BYTES [-1] (encoded PNG/JPEG/WebP files, omitted or empty for none); optional ``negative_prompt``
BYTES [1], ``steps`` INT32 [1], ``true_cfg_scale`` FP32 [1], ``seed`` INT64 [1], ``budget`` INT32 [1] (read as the
CLI's ``--budget``: up to 8192 a side, above a pixel count), ``policy`` BYTES [1], ``width``/``height`` INT32 [1]. Outputs: ``image`` BYTES [1] (PNG) and ``timings``
BYTES [1] (JSON: seconds per stage).

Checks run cheapest first: the request's byte size and reference count before any image is decoded.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.images import MAX_PIXELS, load_image

MODEL_NAME = "uniref_edit"
DEFAULT_SEED = 0  # a request without a seed is reproducible, as `uniref-deploy edit` is


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, Triton data type (as in config.pbtxt, without ``TYPE_``), dims without batch."""

    name: str
    dtype: str
    dims: tuple[int, ...] = (1,)
    optional: bool = False


# `prompt` is optional to Triton so that a request without it reaches the model and gets the project's message.
INPUTS = (
    TensorSpec("prompt", "STRING", optional=True),
    TensorSpec("images", "STRING", (-1,), optional=True),
    TensorSpec("negative_prompt", "STRING", optional=True),
    TensorSpec("steps", "INT32", optional=True),
    TensorSpec("true_cfg_scale", "FP32", optional=True),
    TensorSpec("seed", "INT64", optional=True),
    TensorSpec("budget", "INT32", optional=True),
    TensorSpec("policy", "STRING", optional=True),
    TensorSpec("width", "INT32", optional=True),
    TensorSpec("height", "INT32", optional=True),
)
OUTPUTS = (TensorSpec("image", "STRING"), TensorSpec("timings", "STRING"))

# Pipeline keyword for each optional scalar input, and how to read it
_SCALARS = {
    "negative_prompt": ("negative_prompt", "text"),
    "steps": ("num_inference_steps", int),
    "true_cfg_scale": ("true_cfg_scale", float),
    "seed": ("seed", int),
    "budget": ("budget", lambda value: Budget.parse(int(value))),  # the CLI's rule (a side up to 8192)
    "policy": ("policy", "text"),
    "width": ("width", int),
    "height": ("height", int),
}


@dataclass(frozen=True)
class RequestLimits:
    """What one request may carry.

    Args:
        max_references (int): reference images per request.
        max_request_bytes (int): total bytes of all input tensors (checked before decoding anything).
    """

    max_references: int = 4
    max_request_bytes: int = 32 * 2**20


def request_bytes(tensors: dict[str, np.ndarray]) -> int:
    """Total payload bytes of the input tensors (BYTES elements counted by their length)."""
    total = 0
    for arr in tensors.values():
        if arr.dtype == object:
            total += sum(len(x) if isinstance(x, (bytes, bytearray, str)) else 8 for x in arr.ravel())
        else:
            total += arr.nbytes
    return total


def parse_request(tensors: dict[str, np.ndarray], limits: RequestLimits) -> dict[str, Any]:
    """Check one request's tensors and return ``Pipeline.__call__`` keyword arguments (``image`` decoded).

    Raises:
        InputError: over the size limit, too many references, a missing or malformed input, an undecodable image.
    """
    size = request_bytes(tensors)
    if size > limits.max_request_bytes:
        raise InputError(
            f"The request is {size / 2**20:.1f} MB, over this server's limit of "
            f"{limits.max_request_bytes / 2**20:g} MB.",
            "send smaller reference images (they are resized to the budget anyway), or start the server with a "
            "larger --max-request-mb.",
        )
    unknown = sorted(set(tensors) - {s.name for s in INPUTS})
    if unknown:
        raise InputError(f"Unknown input(s) {unknown}.", f"use only {[s.name for s in INPUTS]}.")
    blobs = _images(tensors.get("images"), limits.max_references)
    if "prompt" not in tensors:
        raise InputError("The request has no 'prompt' input.", "send the edit instruction as BYTES [1, 1].")
    kwargs: dict[str, Any] = {"prompt": _scalar(tensors, "prompt", "text"), "seed": DEFAULT_SEED}
    for name, (keyword, kind) in _SCALARS.items():
        if name in tensors:
            kwargs[keyword] = _scalar(tensors, name, kind)
    kwargs["image"] = [decode_image(b, i) for i, b in enumerate(blobs)]
    return kwargs


def decode_image(data: bytes, index: int = 0) -> Image.Image:
    """An RGB PIL image from encoded bytes; the pixel limit is checked from the header, before decoding.

    Raises:
        InputError: empty, not an image, truncated or corrupt, or over the pixel limit.
    """
    if not data:
        raise InputError(f"Request image {index} is empty (0 bytes).", "send encoded PNG/JPEG/WebP files.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise InputError(f"Request image {index} is {w}x{h}, over the {MAX_PIXELS / 2**20:.0f} MP limit.",
                                 "downscale it first; the model never sees more than the budget anyway.")
            img.load()
        return load_image(img)
    except InputError:
        raise
    except Image.DecompressionBombError as err:
        raise InputError(f"Request image {index} is too large ({err}).", "downscale it first.") from None
    except UnidentifiedImageError:
        raise InputError(f"Request image {index} ({len(data)} bytes) is not in a format Pillow can read.",
                         "send PNG, JPEG or WebP files.") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(
            f"Request image {index} ({len(data)} bytes) cannot be decoded ({type(err).__name__}: {err}).",
            "the file is corrupt, truncated or not an image; send a valid PNG, JPEG or WebP file.",
        ) from None


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes of a PIL image."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def timings_json(times: Any) -> bytes:
    """The pipeline's ``StageTimes`` as JSON: seconds per stage, the DiT summed over steps."""
    out = {k: (float(sum(v)) if isinstance(v, list) else float(v)) for k, v in vars(times).items()}
    out["dit_steps"] = len(times.dit)
    return json.dumps(out, sort_keys=True).encode()


def _images(arr: np.ndarray | None, max_references: int) -> list[bytes]:
    if arr is None:
        return []
    if arr.dtype != object or arr.ndim != 2 or arr.shape[0] != 1:
        raise InputError(f"Input 'images' has shape {list(arr.shape)}.", "send BYTES [1, K] (one request, K files).")
    if arr.shape[1] > max_references:
        raise InputError(
            f"The request has {arr.shape[1]} reference images, over this server's limit of {max_references}.",
            f"send at most {max_references}, or start the server with a larger --max-references.",
        )
    return [bytes(x) for x in arr[0]]


def budget_value(budget: Budget | int) -> int:
    """The ``budget`` tensor's value for a budget: its side when square (as ``--budget 1024``), else its pixels.

    Raises:
        InputError: a non-square budget of at most 8192 pixels (the wire form would read back as a side).
    """
    budget = Budget.parse(budget)
    if budget.is_square:
        return budget.side
    if Budget.parse(budget.pixels) != budget:
        raise InputError(f"Budget {budget} cannot be sent: a number up to 8192 is read as a side.",
                         "use a square budget (send its side) or more than 8192 pixels.")
    return budget.pixels


def _scalar(tensors: dict[str, np.ndarray], name: str, kind) -> Any:
    arr = tensors[name]
    if arr.size != 1:
        raise InputError(f"Input '{name}' has shape {list(arr.shape)}.", "send shape [1, 1] (one value).")
    value = arr.reshape(-1)[0]
    if kind != "text":
        return kind(value)
    if not isinstance(value, (bytes, np.bytes_)):
        raise InputError(f"Input '{name}' is not BYTES.", "send UTF-8 text as a BYTES tensor.")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"Input '{name}' is not valid UTF-8 ({err.reason} at byte {err.start}).",
                         "send UTF-8 text.") from None
