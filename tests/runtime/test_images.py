"""Tests for runtime/images.py: reading references, rejecting bad files, converting every PIL mode to RGB."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uniref_deploy.runtime import images
from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.images import (
    from_model_output,
    load_image,
    load_images,
    to_model_input,
    to_pil,
    to_rgb,
)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels but holds no pixel data (a lazily made bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def noise_png(path: Path, width: int = 64, height: int = 48) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def assert_one_line_input_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# --- bad files -------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as excinfo:
        load_image(tmp_path / "nope.png")
    assert_one_line_input_error(excinfo, "nope.png", "does not exist")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_input_error(excinfo, "empty.png", "0 bytes")


@pytest.mark.parametrize(
    "content", [b"this is not an image\n" * 10, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40], ids=["text", "bad-png-header"]
)
def test_unreadable_file(tmp_path, content):
    path = tmp_path / "garbage.png"
    path.write_bytes(content)
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_input_error(excinfo, "garbage.png", "cannot be decoded")
    assert excinfo.value.__cause__ is not None  # chained to PIL's own error


def test_truncated_png(tmp_path):
    full = noise_png(tmp_path / "full.png").read_bytes()
    path = tmp_path / "half.png"
    path.write_bytes(full[: len(full) // 2])
    assert Image.open(path).size == (64, 48)  # the header is intact: only decoding can notice
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_input_error(excinfo, "half.png", "cannot be decoded")


@pytest.mark.parametrize(
    ("width", "height"),
    [(9000, 8000), (10000, 10000), (20000, 20000)],
    ids=["over-limit", "in-pil-warning-band", "over-pil-limit"],
)
def test_over_max_pixels_from_header(tmp_path, width, height):
    """Headers claiming 72 MP, 100 MP (PIL warns) and 400 MP (PIL refuses); no pixels are ever allocated."""
    assert width * height > images.MAX_PIXELS
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(width, height))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would add a stray line to the CLI's stderr
        with pytest.raises(InputError) as excinfo:
            load_image(path)
    assert_one_line_input_error(excinfo, "huge.png", "64 MP limit")


def test_just_under_max_pixels_header_is_not_rejected_for_size(tmp_path):
    """At exactly MAX_PIXELS the size check passes; the header-only file then fails to decode instead."""
    path = tmp_path / "edge.png"
    path.write_bytes(png_header(8192, 8192))
    assert images.MAX_PIXELS == 8192 * 8192
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert "cannot be decoded" in str(excinfo.value)


def test_max_pixels_applies_to_files_images_and_arrays(tmp_path, monkeypatch):
    """``MAX_PIXELS`` is monkeypatched down to 40x40 so real, decodable inputs can exceed it cheaply."""
    monkeypatch.setattr(images, "MAX_PIXELS", 40 * 40)
    path = noise_png(tmp_path / "big.png", 64, 48)
    for source in (path, Image.open(path), np.zeros((48, 64, 3), np.uint8)):
        with pytest.raises(InputError, match="over the 0 MP limit"):
            load_image(source)
    assert load_image(np.zeros((40, 40, 3), np.uint8)).size == (40, 40)


def test_zero_area_image():
    with pytest.raises(InputError, match="zero area"):
        load_image(Image.new("RGB", (0, 5)))


def test_bad_array_shape():
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))


# --- conversions -----------------------------------------------------------------------------------------------


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).reshape(-1, 3)


def test_cmyk_tiff_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))  # no ink = white
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # full cyan
    cmyk.save(tmp_path / "cmyk.tif")
    out = load_image(tmp_path / "cmyk.tif")
    np.testing.assert_array_equal(_pixels(out), [[255, 255, 255], [0, 255, 255]])


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 0, 0, 255)).save(tmp_path / "cmyk.jpg", quality=95)  # full black ink
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = load_image(tmp_path / "cmyk.jpg")
    assert out.size == (16, 16)
    assert _pixels(out).max() <= 3


def test_16bit_grayscale_png_is_scaled_to_8bit(tmp_path):
    values = np.array([[0, 32768, 65535, 257, 255]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    out = load_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(_pixels(out)[:, 0], [0, 128, 255, 1, 1])
    assert (_pixels(out) == _pixels(out)[:, :1]).all()  # grey stays grey


def test_dark_16bit_image_stays_dark():
    """A 16-bit image whose values are all <= 255 is nearly black, not an 8-bit image in disguise."""
    dark = Image.fromarray(np.full((2, 2), 255, dtype=np.uint16))
    assert dark.mode == "I;16"
    assert _pixels(to_rgb(dark)).max() == 1


def test_rgba_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[0, :, 3] = [0, 128, 255]  # transparent, half, opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(_pixels(out), [[255, 255, 255], [255, 127, 127], [255, 0, 0]])


def test_la_alpha_is_composited_on_white(tmp_path):
    Image.fromarray(np.array([[[0, 0], [0, 255], [100, 255]]], np.uint8), "LA").save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    np.testing.assert_array_equal(_pixels(out), [[255, 255, 255], [0, 0, 0], [100, 100, 100]])


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2])
    pal.save(tmp_path / "p.png", transparency=0)  # palette index 0 (red) is transparent
    assert Image.open(tmp_path / "p.png").info.get("transparency") == 0
    out = load_image(tmp_path / "p.png")
    np.testing.assert_array_equal(_pixels(out), [[255, 255, 255], [0, 0, 255], [0, 255, 0]])


def test_palette_without_transparency_keeps_colours(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    pal.putdata([0, 1])
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(_pixels(load_image(tmp_path / "p.png")), [[255, 0, 0], [0, 0, 255]])


@pytest.mark.parametrize("mode", ["1", "L", "I", "F", "YCbCr", "HSV"])
def test_other_modes_become_rgb(mode):
    """White in each mode stays white: 255 for 8-bit and 32-bit "I" (values <= 255), 1.0 for float "F"."""
    src = Image.new("F", (3, 2), 1.0) if mode == "F" else Image.new("L", (3, 2), 255).convert(mode)
    out = to_rgb(src)
    assert out.mode == "RGB" and out.size == (3, 2)
    assert _pixels(out).min() >= 250


def test_float_array_input():
    arr = np.array([[[0.0, 0.5, 1.0]]], np.float32)
    np.testing.assert_array_equal(_pixels(load_image(arr)), [[0, 128, 255]])


def test_load_images_keeps_order(tmp_path):
    a = noise_png(tmp_path / "a.png", 20, 10)
    b = noise_png(tmp_path / "b.png", 10, 30)
    assert [im.size for im in load_images([a, b])] == [(20, 10), (10, 30)]


# --- model-range conversion ------------------------------------------------------------------------------------


def test_model_range_round_trip():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
    x = to_model_input(img, 12, 8)
    assert x.shape == (1, 3, 8, 12) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    back = to_pil(from_model_output(x))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(img))
