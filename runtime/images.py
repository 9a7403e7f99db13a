"""Reading, validating and converting reference images; pixel <-> model-range conversion.

Anything PIL can open is accepted; CMYK, 16-bit, alpha and palette images are converted to RGB (alpha is
composited on white) rather than rejected. Unreadable, truncated or empty files and images over
``MAX_PIXELS`` raise ``InputError`` with a one-line hint.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError
from .fileio import temp_name

MAX_PIXELS = 64 * 1024 * 1024  # refuse decompression bombs and absurd inputs early


def load_image(source: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
    """Return an RGB PIL image from a path, a PIL image or an HWC uint8/float array.

    Raises:
        InputError: the file is missing, empty, unreadable, truncated or larger than ``MAX_PIXELS``.
    """
    if isinstance(source, Image.Image):
        return to_rgb(_check_size(source, "image"))
    if isinstance(source, np.ndarray):
        return to_rgb(_check_size(_array_to_pil(source), "array"))
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"A reference image is a {type(source).__name__}.",
                         "pass a path, a PIL image or an HxWx3 array per reference.")
    path = Path(source)
    try:
        is_file = path.is_file()
    except (OSError, ValueError) as err:  # an over-long name, a NUL byte
        raise InputError(f"Image path {str(path)[:80]!r} is not usable ({err}).", "check the path.") from None
    if not is_file:
        what = "is a folder" if path.is_dir() else "does not exist"
        raise InputError(f"Image '{path}' {what}.", "check the path passed with --image.")
    if path.stat().st_size == 0:
        raise InputError(f"Image '{path}' is an empty file (0 bytes).", "pass a valid PNG/JPEG/WebP image.")
    try:
        with warnings.catch_warnings():
            # PIL warns between its own limit (~89 MP) and twice that; MAX_PIXELS is lower and checked below, so
            # the warning would only add a stray stderr line in front of the one-line error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            _check_size(img, str(path))
            img.load()
            return to_rgb(img)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise InputError(
            f"Image '{path}' cannot be decoded ({type(err).__name__}: {err}).",
            "the file is corrupt, truncated or not an image; re-export it as PNG or JPEG.",
        ) from err
    except Image.DecompressionBombError as err:  # PIL refuses twice its MAX_IMAGE_PIXELS before we see the size
        raise InputError(
            f"Image '{path}' is over the {MAX_PIXELS / 2**20:.0f} MP limit ({err}).", "downscale it first."
        ) from err


def _check_size(img: Image.Image, name: str) -> Image.Image:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise InputError(f"Image '{name}' has zero area ({w}x{h}).", "pass a non-empty image.")
    if w * h > MAX_PIXELS:
        raise InputError(
            f"Image '{name}' is {w}x{h} = {w * h / 2**20:.1f} MP, over the {MAX_PIXELS / 2**20:.0f} MP limit "
            f"({MAX_PIXELS} pixels).",
            "downscale it first; the model never sees more than the budget anyway.",
        )
    return img


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.size == 0:
        raise InputError(f"Image array has shape {arr.shape}.", "pass a non-empty HxWx3 (or HxW, HxWx4) array.")
    if arr.dtype.kind not in "uifb":
        raise InputError(f"Image array has dtype {arr.dtype}.", "pass uint8 or float values in [0, 1].")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError("Image array holds NaN or infinite values.", "pass finite values in [0, 1].")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is composited over white."""
    if img.mode == "RGB":
        return img.copy() if img.readonly else img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # I;16* is 16-bit by definition; 32-bit "I" (e.g. 16-bit PNGs on older Pillow) is judged by its range.
        scale = 65535.0 if img.mode != "I" or arr.max() > 255 else 255.0
        return Image.fromarray((arr / scale * 255.0).round().clip(0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        return _array_to_pil(np.clip(arr, 0.0, 1.0).astype(np.float32)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize(img: Image.Image, width: int, height: int) -> Image.Image:
    """Lanczos resize to (width, height), as diffusers' VaeImageProcessor does."""
    if img.size == (width, height):
        return img
    return img.resize((width, height), resample=Image.Resampling.LANCZOS)


def to_model_input(img: Image.Image, width: int, height: int) -> np.ndarray:
    """Resize and map to the VAE's range: float32 [1, 3, H, W] in [-1, 1]."""
    arr = np.asarray(resize(img, width, height), dtype=np.float32) / 255.0
    return (arr * 2.0 - 1.0).transpose(2, 0, 1)[None].copy()


def from_model_output(x: np.ndarray) -> np.ndarray:
    """Map decoder output [1, 3, H, W] in [-1, 1] to float32 HWC in [0, 1]."""
    return np.clip(x[0].astype(np.float32) / 2.0 + 0.5, 0.0, 1.0).transpose(1, 2, 0)


def to_pil(hwc: np.ndarray) -> Image.Image:
    """float32 HWC in [0, 1] -> 8-bit RGB PIL image (round half to even, as diffusers)."""
    return Image.fromarray((hwc * 255.0).round().astype(np.uint8))


def as_sources(image: object) -> list:
    """The reference list of a request: None -> [], one path / PIL image / array -> [it], a list or tuple as is.

    Raises:
        InputError: anything else (a number, a dict, a set).
    """
    if image is None:
        return []
    if isinstance(image, (str, os.PathLike, Image.Image, np.ndarray)):
        return [image]
    if isinstance(image, (list, tuple)):
        return list(image)
    raise InputError(f"image is a {type(image).__name__}.", "pass one image (path, PIL image, array) or a list of them.")


OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def output_format(path: str | os.PathLike) -> str:
    """The PIL format for an output file, from its extension.

    Raises:
        InputError: the extension is not one of ``OUTPUT_FORMATS``.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise InputError(f"Cannot tell the image format of '{path}' from its extension '{suffix}'.",
                         f"end the name with one of {', '.join(OUTPUT_FORMATS)}.")
    return OUTPUT_FORMATS[suffix]


def check_output_path(path: str | os.PathLike) -> str:
    """Check, before any compute, that an image can be written at ``path``; returns its PIL format.

    Raises:
        InputError: unknown extension, a folder at ``path``, or a parent that is a file, cannot be created or is not
            writable (a missing parent folder is created).
    """
    fmt = output_format(path)
    out = Path(path)
    parent = out.parent
    if out.is_dir():
        raise InputError(f"Output '{out}' is a folder.", "pass a file name such as out.png.")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"The output folder '{parent}' is a file.", "pick another path.")
    try:  # a missing output folder is created, as `-o results/out.png` expects
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"Cannot create the output folder '{parent}': {err.strerror or err}.",
                         "pick another path.") from None
    try:  # a real write probe: access() says yes to root on read-only mounts
        with tempfile.NamedTemporaryFile(dir=parent, prefix=temp_name(out.name), suffix=".probe"):
            pass
    except OSError as err:
        raise InputError(f"Cannot write into '{parent}': {err.strerror or err}.", "pick a writable location.") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise InputError(f"Cannot replace '{out}': permission denied.", "pick a writable location.")
    return fmt


def load_images(sources: object) -> list[Image.Image]:
    """``load_image`` over ``as_sources(sources)``: a single image or path counts as one reference."""
    return [load_image(s) for s in as_sources(sources)]


def image_digest(img: Image.Image) -> str:
    """sha256 of an image's content (size, mode, pixels): the one key per reference that the VAE-latent and
    prompt-embedding caches share."""
    h = hashlib.sha256(f"{img.size}{img.mode}".encode())
    h.update(img.tobytes())
    return h.hexdigest()
