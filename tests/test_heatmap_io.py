"""Heatmap encodings: exact round trips, and overlays that match OpenCV's JET rendering."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from workers.heatmap_io import (
    JET_LUT,
    decode_npy,
    decode_png_gray,
    encode_npy,
    encode_png_gray,
    jet_colormap,
    overlay_jpeg,
    overlay_rgb,
    to_uint8,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_to_uint8_hits_every_level(dtype: torch.dtype) -> None:
    levels = torch.arange(256, dtype=torch.float64)
    quantised = to_uint8((levels / 255).to(dtype).reshape(16, 16))

    assert quantised.dtype == torch.uint8
    assert quantised.shape == (16, 16)
    assert torch.equal(quantised.flatten().long(), levels.long())


def test_to_uint8_rounds_clips_and_zeroes_nan(rng: np.random.Generator) -> None:
    values = np.concatenate([rng.uniform(-0.5, 1.5, size=94), [np.nan, 0.5 / 255]]).reshape(2, 3, 16)
    expected = np.round(np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * 255).astype(np.uint8)

    quantised = to_uint8(torch.from_numpy(values).float())

    assert quantised.shape == (2, 3, 16)
    np.testing.assert_array_equal(quantised.numpy(), expected)


def test_to_uint8_keeps_the_device_and_refuses_integers() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert to_uint8(torch.rand(2, 8, 8, device=device)).device.type == device
    with pytest.raises(TypeError, match="floating-point"):
        to_uint8(torch.zeros(4, 4, dtype=torch.uint8))


def test_png_round_trip_is_exact(rng: np.random.Generator) -> None:
    u8 = rng.integers(0, 256, size=(37, 53), dtype=np.uint8)

    data = encode_png_gray(u8)
    decoded = decode_png_gray(data)

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as image:
        assert (image.mode, image.size) == ("L", (53, 37))
    assert decoded.dtype == np.uint8 and decoded.shape == (37, 53)
    np.testing.assert_array_equal(decoded, u8)


def test_png_of_a_smooth_224_map_is_small() -> None:
    yy, xx = np.mgrid[0:224, 0:224]
    smooth = np.exp(-((yy - 80.0) ** 2 + (xx - 150.0) ** 2) / (2 * 40.0**2))
    data = encode_png_gray(np.round(smooth * 255).astype(np.uint8))

    assert len(data) < 224 * 224 / 2  # compresses to well under half the raw bytes
    np.testing.assert_array_equal(decode_png_gray(data), np.round(smooth * 255).astype(np.uint8))


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((2, 4, 4), np.uint8)])
def test_png_refuses_other_arrays(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        encode_png_gray(bad)


def test_png_decode_refuses_colour_images() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    with pytest.raises(ValueError, match="grayscale"):
        decode_png_gray(buffer.getvalue())


def test_npy_round_trip_is_exact_in_float16(rng: np.random.Generator) -> None:
    raw = (rng.standard_normal((3, 7, 7)) * 50).astype(np.float16)
    raw[0, 0, 0] = np.float16(6e-8)  # a subnormal survives too

    decoded = decode_npy(encode_npy(raw))

    assert decoded.dtype == np.float16 and decoded.shape == (3, 7, 7)
    np.testing.assert_array_equal(decoded, raw)


def test_npy_stores_float32_as_float16(rng: np.random.Generator) -> None:
    raw = rng.uniform(0, 3, size=(7, 7)).astype(np.float32)
    decoded = decode_npy(encode_npy(raw))

    assert decoded.dtype == np.float16
    np.testing.assert_array_equal(decoded, raw.astype(np.float16))


def test_npy_refuses_values_beyond_float16() -> None:
    with pytest.raises(ValueError, match="float16's range"):
        encode_npy(np.array([1.0, 70000.0], dtype=np.float32))


def test_npy_decode_refuses_pickles() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_npy(buffer.getvalue())


def test_jet_table_matches_opencv() -> None:
    reference = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, ::-1]
    difference = np.abs(JET_LUT.astype(int) - reference.astype(int))

    assert difference.max() <= 1
    assert (difference > 0).sum() <= 2
    np.testing.assert_array_equal(jet_colormap(np.array([[0, 255]], np.uint8)), JET_LUT[[[0, 255]]])


def _reference_overlay(image: Image.Image, map01: np.ndarray, alpha: float) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    resized = cv2.resize(map01.astype(np.float32), image.size, interpolation=cv2.INTER_LINEAR)
    levels = np.round(np.clip(resized, 0, 1) * 255).astype(np.uint8)
    colours = cv2.applyColorMap(levels, cv2.COLORMAP_JET)[..., ::-1].astype(np.float32)
    return np.round(alpha * colours + (1 - alpha) * rgb)


def _test_image(width: int, height: int) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_overlay_matches_opencv_jet_blend(rng: np.random.Generator, alpha: float) -> None:
    image = _test_image(120, 90)
    map01 = rng.uniform(0, 1, size=(7, 7))

    ours = overlay_rgb(image, map01, alpha)
    reference = _reference_overlay(image, map01, alpha)

    assert ours.shape == (90, 120, 3) and ours.dtype == np.uint8
    difference = np.abs(ours.astype(np.float32) - reference)
    # Steep JET ramps turn a one-level difference in the resized map into a few colour levels.
    assert np.percentile(difference, 99) <= 3
    assert difference.mean() < 0.5


def test_overlay_jpeg_has_the_image_size_and_colours(rng: np.random.Generator) -> None:
    image = _test_image(161, 119).convert("L")  # not RGB: the overlay converts
    map01 = rng.uniform(0, 1, size=(7, 7))

    data = overlay_jpeg(image, map01)

    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "JPEG"
        assert decoded.size == image.size
        pixels = np.asarray(decoded.convert("RGB"), dtype=np.float32)
    reference = _reference_overlay(image, map01, 0.5)
    assert np.abs(pixels - reference).mean() < 3  # JPEG loss (chroma subsampled) on top of the blend


def test_overlay_refuses_bad_arguments() -> None:
    image = _test_image(8, 8)
    with pytest.raises(ValueError, match="one \\[H, W\\] map"):
        overlay_rgb(image, np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="alpha"):
        overlay_rgb(image, np.zeros((4, 4)), alpha=1.5)
    with pytest.raises(ValueError, match="quality"):
        overlay_jpeg(image, np.zeros((4, 4)), quality=0)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (224, 224), (37, 53)])
def test_png_is_read_identically_by_libpng(shape: tuple[int, int], rng: np.random.Generator) -> None:
    u8 = rng.integers(0, 256, size=shape, dtype=np.uint8)  # big steps wrap the Sub filter modulo 256
    data = encode_png_gray(u8)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded.reshape(shape), u8)


def test_png_refuses_an_empty_map() -> None:
    with pytest.raises(ValueError, match="empty"):
        encode_png_gray(np.zeros((0, 5), np.uint8))


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_png_levels_all_decode_to_the_map(level: int, rng: np.random.Generator) -> None:
    u8 = rng.integers(0, 256, size=(31, 47), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png_gray(encode_png_gray(u8, compress_level=level)), u8)


@pytest.mark.parametrize("level", [-1, 4, 9])
def test_png_refuses_a_level_the_encoder_lacks(level: int) -> None:
    with pytest.raises(ValueError, match=r"ISA-L's levels \(0, 1, 2, 3\)"):
        encode_png_gray(np.zeros((4, 4), np.uint8), compress_level=level)
