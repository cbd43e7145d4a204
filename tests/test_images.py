"""Image decoding against files built here with known pixels: formats, modes, bit depths,
EXIF orientation, DICOM, damaged and hostile files, and memory on huge inputs."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from workers.images import (
    MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    decode_pixels,
    normalise_batch,
    open_rgb,
    stack_pixels,
)

try:
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEGLSLossless,
        RLELossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )
except ImportError:  # DICOM is optional at run time: the other formats are tested without it
    FileDataset = None

needs_pydicom = pytest.mark.skipif(FileDataset is None, reason="DICOM tests need pydicom")

IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
RED, GREEN, BLUE, WHITE = (220, 30, 40), (20, 200, 60), (30, 50, 210), (240, 240, 240)


def _levels(data: bytes, size: tuple[int, int], **kwargs) -> np.ndarray:
    """Decoded pixels back on the 0..255 scale, HWC, with an identity normalisation."""
    decoded = decode_image(data, size, *IDENTITY, **kwargs)
    return (decoded.tensor * 255).permute(1, 2, 0).numpy()


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _quadrants(width: int, height: int) -> np.ndarray:
    """Four colours, one per quadrant: any flip or turn moves them somewhere recognisable."""
    arr = np.empty((height, width, 3), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    arr[:h2, :w2], arr[:h2, w2:], arr[h2:, :w2], arr[h2:, w2:] = RED, GREEN, BLUE, WHITE
    return arr


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(
    width: int, height: int, bit_depth: int, colour_type: int, rows: list[bytes], extra: bytes = b""
) -> bytes:
    """A PNG written chunk by chunk, so its header may claim anything."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + extra
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def _tiff(
    width: int, height: int, bits: int, samples: int, photometric: int, pixels: bytes, order: str
) -> bytes:
    """A one-strip baseline TIFF in either byte order (Pillow writes neither 16-bit RGB nor big-endian)."""
    tags = 10
    values_at = 8 + 2 + tags * 12 + 4
    bits_field = struct.pack(f"{order}{samples}H", *([bits] * samples))
    pixels_at = values_at + len(bits_field)

    def entry(tag: int, kind: int, count: int, value: bytes) -> bytes:
        return struct.pack(f"{order}HHI", tag, kind, count) + value.ljust(4, b"\x00")

    def short(v: int) -> bytes:
        return struct.pack(f"{order}H", v)

    def long(v: int) -> bytes:
        return struct.pack(f"{order}I", v)

    entries = [
        entry(256, 4, 1, long(width)),
        entry(257, 4, 1, long(height)),
        entry(258, 3, samples, short(bits) if samples == 1 else long(values_at)),
        entry(259, 3, 1, short(1)),
        entry(262, 3, 1, short(photometric)),
        entry(273, 4, 1, long(pixels_at)),
        entry(277, 3, 1, short(samples)),
        entry(278, 4, 1, long(height)),
        entry(279, 4, 1, long(len(pixels))),
        entry(284, 3, 1, short(1)),
    ]
    magic = b"II*\x00" if order == "<" else b"MM\x00*"
    return magic + long(8) + short(tags) + b"".join(entries) + long(0) + bits_field + pixels


# --- formats and modes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params", "tolerance"),
    [
        ("PNG", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("TIFF", {"compression": "tiff_lzw"}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("GIF", {}, 0),
        ("JPEG", {"quality": 95}, 10),
    ],
)
def test_formats_decode_to_their_pixels(fmt: str, params: dict, tolerance: int) -> None:
    reference = _quadrants(40, 30)
    data = _encode(Image.fromarray(reference), fmt, **params)
    decoded = decode_image(data, (30, 40), *IDENTITY)
    assert decoded.tensor.shape == (3, 30, 40) and decoded.tensor.dtype == torch.float32
    assert (decoded.width, decoded.height) == (40, 30)
    got = (decoded.tensor * 255).permute(1, 2, 0).numpy()
    interior = (slice(3, 12), slice(3, 17))  # away from JPEG's ringing at colour edges
    assert np.abs(got[interior] - reference[interior]).max() <= tolerance + 1e-3
    assert np.abs(got - reference).mean() <= tolerance + 1e-3


def test_normalisation_is_mean_and_std_per_channel() -> None:
    data = _encode(Image.new("RGB", (4, 3), (255, 0, 128)), "PNG")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tensor = decode_image(data, (3, 4), mean, std).tensor
    expected = [(1.0 - mean[0]) / std[0], (0.0 - mean[1]) / std[1], (128 / 255 - mean[2]) / std[2]]
    assert tensor.is_contiguous()
    torch.testing.assert_close(tensor[:, 1, 2], torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_resize_stretches_to_the_model_size_and_keeps_the_source_size() -> None:
    data = _encode(Image.fromarray(_quadrants(90, 30)), "PNG")
    decoded = decode_image(data, (16, 24), *IDENTITY)
    assert decoded.tensor.shape == (3, 16, 24) and (decoded.width, decoded.height) == (90, 30)
    got = (decoded.tensor * 255).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got[2, 2], RED, atol=1)
    np.testing.assert_allclose(got[13, 21], WHITE, atol=1)


def test_grey_bilevel_and_palette_images_become_rgb() -> None:
    grey = np.array([[0, 77, 200, 255]], dtype=np.uint8)
    np.testing.assert_allclose(
        _levels(_encode(Image.fromarray(grey), "PNG"), (1, 4)), np.repeat(grey[..., None], 3, 2)
    )
    bilevel = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    np.testing.assert_allclose(_levels(_encode(bilevel, "PNG"), (1, 2))[0, :, 0], [0, 255])
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 150, 100])
    palette.putpixel((1, 0), 1)
    for fmt in ("PNG", "GIF", "BMP"):
        np.testing.assert_allclose(_levels(_encode(palette, fmt), (1, 2))[0], [[10, 20, 30], [200, 150, 100]])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_composited_over_black(fmt: str) -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([250, 240, 230, 10, 200, 30])
    palette.putpixel((1, 0), 1)
    got = _levels(_encode(palette, fmt, transparency=0), (1, 2))[0]
    np.testing.assert_allclose(got, [[0, 0, 0], [10, 200, 30]])


def test_alpha_is_premultiplied_onto_black() -> None:
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    got = _levels(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), (1, 3))[0]
    half = np.rint(np.array([200, 100, 50]) * 128 / 255)
    np.testing.assert_allclose(got, [[200, 100, 50], [0, 0, 0], half], atol=1)
    la = np.array([[[180, 255], [180, 0]]], dtype=np.uint8)
    got = _levels(_encode(Image.fromarray(la, "LA"), "PNG"), (1, 2))[0]
    np.testing.assert_allclose(got, [[180, 180, 180], [0, 0, 0]])


@pytest.mark.parametrize(("fmt", "tolerance"), [("TIFF", 0), ("JPEG", 3)])
def test_cmyk_becomes_rgb(fmt: str, tolerance: int) -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # full magenta + yellow: red
    got = _levels(_encode(cmyk, fmt), (8, 8))
    np.testing.assert_allclose(got[4, 4], [255, 0, 0], atol=tolerance)


# --- 16-bit and other deep images ---------------------------------------------------------------

# Short of the full range on purpose: stretching by the image's own range would give 0 and 255.
SIXTEEN = np.array([[1000, 12850, 25700, 40000]], dtype=np.uint16)
SIXTEEN_AS_8 = np.rint(SIXTEEN / 65535 * 255)  # [4, 50, 100, 156]: scaled by the bit depth


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_png(4, 1, 16, 0, [SIXTEEN.astype(">u2").tobytes()]), id="png"),
        pytest.param(_encode(Image.fromarray(SIXTEEN), "TIFF"), id="tiff-pillow"),
        pytest.param(_tiff(4, 1, 16, 1, 1, SIXTEEN.astype("<u2").tobytes(), "<"), id="tiff-little-endian"),
        pytest.param(_tiff(4, 1, 16, 1, 1, SIXTEEN.astype(">u2").tobytes(), ">"), id="tiff-big-endian"),
    ],
)
def test_sixteen_bit_grey_is_scaled_by_its_bit_depth(data: bytes) -> None:
    got = _levels(data, (1, 4))
    np.testing.assert_allclose(got[0], np.repeat(SIXTEEN_AS_8.T, 3, axis=1), atol=1e-3)


def test_png_significant_bits_set_the_full_scale() -> None:
    twelve_bit = np.array([[100, 1000, 2048, 3000]], dtype=np.uint16)
    data = _png(4, 1, 16, 0, [twelve_bit.astype(">u2").tobytes()], extra=_png_chunk(b"sBIT", bytes([12])))
    np.testing.assert_allclose(_levels(data, (1, 4))[0, :, 0], np.rint(twelve_bit[0] / 4095 * 255))


def test_sixteen_bit_colour_agrees_with_sixteen_bit_grey() -> None:
    rgb16 = np.array([[[65535, 32768, 256], [1000, 25700, 0]]], dtype=np.uint16)
    png = _png(2, 1, 16, 2, [rgb16.astype(">u2").tobytes()])
    tiff = _tiff(2, 1, 16, 3, 2, rgb16.astype("<u2").tobytes(), "<")
    for data in (png, tiff):
        # Pillow keeps the high byte of colour samples: the bit-depth rule, truncated not rounded.
        np.testing.assert_allclose(_levels(data, (1, 2))[0], rgb16[0] / 65535 * 255, atol=1)


def test_images_without_a_full_scale_are_stretched_by_their_range() -> None:
    floats = np.array([[-2.0, 0.0, np.nan, 2.0]], dtype=np.float32)
    got = _levels(_encode(Image.fromarray(floats, "F"), "TIFF"), (1, 4))[0, :, 0]
    np.testing.assert_allclose(got, [0, 128, 0, 255])
    wide = np.array([[-100000, 0, 100000, 300000]], dtype=np.int32)
    got = _levels(_encode(Image.fromarray(wide, "I"), "TIFF"), (1, 4))[0, :, 0]
    np.testing.assert_allclose(got, np.rint((wide[0] + 100000) / 400000 * 255))


# --- EXIF orientation -----------------------------------------------------------------------------


def _stored_for_orientation(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores when EXIF says where row 0 and column 0 of the scene are."""
    return {
        1: lambda u: u,  # row 0 = top, column 0 = left
        2: lambda u: u[:, ::-1],  # top, right
        3: lambda u: u[::-1, ::-1],  # bottom, right
        4: lambda u: u[::-1, :],  # bottom, left
        5: lambda u: u.transpose(1, 0, 2),  # left, top
        6: lambda u: u[:, ::-1].transpose(1, 0, 2),  # right, top
        7: lambda u: u[::-1, ::-1].transpose(1, 0, 2),  # right, bottom
        8: lambda u: u[::-1, :].transpose(1, 0, 2),  # left, bottom
    }[orientation](upright)


def _with_orientation(upright: np.ndarray, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(np.ascontiguousarray(_stored_for_orientation(upright, orientation)))
    params = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    return _encode(stored, fmt, exif=exif if fmt == "TIFF" else exif.tobytes(), **params)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_lossless_matches_upright_exactly(orientation: int, fmt: str) -> None:
    upright = _quadrants(48, 32)
    upright[0, 0] = (1, 2, 3)  # one marked corner: tells a flip from a turn
    data = _with_orientation(upright, orientation, fmt)
    decoded = decode_image(data, (32, 48), *IDENTITY)
    assert (decoded.width, decoded.height) == (48, 32)
    np.testing.assert_allclose((decoded.tensor * 255).permute(1, 2, 0).numpy(), upright, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(open_rgb(data)), upright)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_a_downscaled_jpeg(orientation: int) -> None:
    upright = _quadrants(640, 400)
    reference = _levels(_encode(Image.fromarray(upright), "JPEG", quality=95), (50, 80))
    decoded = decode_image(_with_orientation(upright, orientation, "JPEG"), (50, 80), *IDENTITY)
    assert (decoded.width, decoded.height) == (640, 400)
    got = (decoded.tensor * 255).permute(1, 2, 0).numpy()
    for (y, x), colour in zip(
        [(12, 20), (12, 60), (37, 20), (37, 60)], [RED, GREEN, BLUE, WHITE], strict=True
    ):
        np.testing.assert_allclose(got[y, x], colour, atol=6)
    assert np.abs(got - reference).mean() < 2.0


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_unreadable_exif_leaves_the_image_as_stored() -> None:
    stored = _quadrants(20, 10)
    data = _encode(Image.fromarray(stored), "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*garbage")
    decoded = decode_image(data, (10, 20), *IDENTITY)
    assert (decoded.width, decoded.height) == (20, 10)


# --- damaged, foreign and hostile files -----------------------------------------------------------


NOISE = Image.effect_noise((64, 48), 60).convert("RGB")
JPEG_NOISE = _encode(NOISE, "JPEG")
PNG_NOISE = _encode(NOISE, "PNG")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (JPEG_NOISE[: len(JPEG_NOISE) // 2], "truncated"),
        (JPEG_NOISE[:100], "truncated"),
        (PNG_NOISE[: len(PNG_NOISE) // 2], "truncated"),
        (PNG_NOISE[:30], "PNG header"),
        (b"label,uri\ncat,images/1.png\n", "holds text"),
        ("caf\u00e9 \u2014 not a picture".encode(), "holds text"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF document"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIF"),
        (_encode(Image.new("RGB", (8, 8)), "PPM"), "unsupported image format: the file is a Netpbm image"),
        (_encode(Image.new("RGB", (8, 8)), "TGA"), "unrecognised image format"),
        (bytes(range(7, 256)) * 2, "unrecognised image format"),
    ],
    ids=[
        "empty",
        "jpeg-half",
        "jpeg-header-only",
        "png-half",
        "png-signature-only",
        "csv-text",
        "unicode-text",
        "pdf",
        "heic",
        "ppm",
        "tga",
        "noise",
    ],
)
def test_bad_files_fail_with_their_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data, (8, 8), *IDENTITY)


SECRET = "db.internal:5432:prod:admin:S3cretPassw0rd"


@pytest.mark.parametrize(
    "data",
    [
        SECRET.encode(),
        ("# pgpass\n" + SECRET + "\n").encode(),
        b"\x89PNG\r\n\x1a\n" + SECRET.encode(),
        b"GIF89a" + SECRET.encode(),
        bytes([0xF7, 0x01, 0x02]) + SECRET.encode() + bytes(range(0, 256)),
        b"PK\x03\x04" + SECRET.encode(),
    ],
    ids=["text", "pgpass", "png-signature", "gif-signature", "binary", "zip"],
)
def test_a_failure_names_the_kind_of_content_never_its_bytes(data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, (8, 8), *IDENTITY)
    reason = str(caught.value)
    for fragment in (SECRET[:6], "S3cret", "5432", SECRET.encode()[:4].hex(), "db.inte"):
        assert fragment not in reason, reason
    assert data[:8].hex(" ") not in reason


def test_unidentified_files_are_never_offered_to_other_pillow_plugins() -> None:
    """A reader outside the accepted formats must not even be asked whether it knows the bytes."""
    asked: list[bytes] = []

    def accept(prefix: bytes) -> bool:
        asked.append(prefix)
        return False

    Image.register_open("CAMAUDITTRAP", ImageFile.ImageFile, accept)
    try:
        with pytest.raises(ImageDecodeError, match="unrecognised image format"):
            decode_image(bytes(range(7, 256)) * 2, (8, 8), *IDENTITY)
        with pytest.raises(ImageDecodeError, match="Netpbm"):
            decode_image(_encode(Image.new("RGB", (8, 8)), "PPM"), (8, 8), *IDENTITY)
    finally:
        Image.OPEN.pop("CAMAUDITTRAP", None)
        Image.ID.remove("CAMAUDITTRAP")
    assert asked == []


def test_pixel_limit_is_configurable_and_checked_before_decoding() -> None:
    data = _encode(Image.new("RGB", (200, 100)), "PNG")
    with pytest.raises(ImageDecodeError, match=r"200x100 = 20,000 pixels is over the limit of 19,999"):
        decode_image(data, (8, 8), *IDENTITY, max_pixels=19_999)
    assert decode_image(data, (8, 8), *IDENTITY, max_pixels=20_000).width == 200


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (12_001, 12_000)])
def test_decompression_bomb_fails_fast(width: int, height: int) -> None:
    bomb = _png(width, height, 8, 0, [b"\x00" * 16])  # a few hundred bytes claiming a huge grey image
    assert len(bomb) < 200 and width * height > MAX_PIXELS
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="over the limit of") as caught:
        decode_image(bomb, (8, 8), *IDENTITY)
    assert time.perf_counter() - started < 0.5
    assert f"{width * height:,} pixels" in str(caught.value)


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, re, sys, time
    from workers.images import ImageDecodeError, decode_image

    def memory_mb(field):
        status = open("/proc/self/status").read()
        return int(re.search(field + r":\\s+(\\d+) kB", status).group(1)) / 1024

    data = open(sys.argv[1], "rb").read()
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    decode_image(open(sys.argv[2], "rb").read(), (4, 4), mean, std)  # warm-up: lazy imports, pools
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak (VmHWM) restarts from the current RSS
    before = memory_mb("VmRSS")
    started = time.perf_counter()
    try:
        out = decode_image(data, (224, 224), mean, std)
        left, right = out.tensor[:, 112, 50].tolist(), out.tensor[:, 112, 170].tolist()
        result = {"width": out.width, "height": out.height, "left": left, "right": right}
    except ImageDecodeError as exc:
        result = {"error": str(exc)}
    result["seconds"] = time.perf_counter() - started
    result["peak_growth_mb"] = memory_mb("VmHWM") - before
    print(json.dumps(result))
    """
)


def _probe(path: Path, tmp_path: Path) -> dict:
    """Decode in a fresh process, with its peak RSS reset (Linux) just before decoding."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("measuring peak memory needs Linux's /proc/self/clear_refs")
    small = tmp_path / "small.png"
    small.write_bytes(_encode(Image.new("RGB", (8, 8)), "PNG"))
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path), str(small)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_large_jpeg_decodes_at_reduced_scale_in_bounded_memory(tmp_path: Path) -> None:
    width, height = 8000, 6000
    image = Image.new("RGB", (width, height), RED)
    image.paste(GREEN, (width // 2, 0, width, height))
    path = tmp_path / "large.jpg"
    image.save(path, quality=90)
    del image
    result = _probe(path, tmp_path)
    assert (result["width"], result["height"]) == (width, height)  # the original size, for boxes
    left, right = np.array(result["left"]) * 255, np.array(result["right"]) * 255
    assert np.abs(left - RED).max() < 8 and np.abs(right - GREEN).max() < 8
    full_decode_mb = width * height * 3 / 2**20  # 137 MB as 8-bit RGB
    assert result["peak_growth_mb"] < full_decode_mb / 4, result


def test_bomb_allocates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(100_000, 100_000, 8, 2, [b"\x00" * 48]))
    result = _probe(path, tmp_path)
    assert "over the limit" in result["error"]
    assert result["peak_growth_mb"] < 8, result


# --- DICOM ----------------------------------------------------------------------------------------


def _dataset(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", *, preamble: bool = True, **tags
) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("image.dcm", {}, file_meta=meta, preamble=b"\x00" * 128 if preamble else None)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if photometric == "RGB" else pixels.shape[-2:]
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if pixels.ndim == (4 if photometric == "RGB" else 3):
        ds.NumberOfFrames = pixels.shape[0]
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    return ds


def _dicom_bytes(ds: FileDataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=ds.preamble is not None)
    return buf.getvalue()


def _dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> bytes:
    return _dicom_bytes(_dataset(pixels, photometric, **tags))


# Stored values whose modality values (2 * s - 100) are 20, 90, 110, 180: with a window of
# centre 100.5 and width 101 the ramp runs from 50 to 150, so levels are 0, 0.4, 0.6 and 1 of 255.
STORED = np.array([[60, 95, 105, 140]], dtype=np.uint16)
WINDOWED = np.array([0, 102, 153, 255])
RESCALE = {"RescaleSlope": 2, "RescaleIntercept": -100}


def _grey(data: bytes, size: tuple[int, int], **kwargs) -> np.ndarray:
    levels = _levels(data, size, **kwargs)
    assert np.array_equal(levels[..., 0], levels[..., 1]) and np.array_equal(levels[..., 0], levels[..., 2])
    return levels[..., 0]


@needs_pydicom
def test_dicom_rescale_then_window() -> None:
    data = _dicom(STORED, WindowCenter=100.5, WindowWidth=101, **RESCALE)
    assert data[128:132] == b"DICM"
    np.testing.assert_allclose(_grey(data, (1, 4))[0], WINDOWED)


@needs_pydicom
def test_dicom_monochrome1_is_inverted() -> None:
    data = _dicom(STORED, "MONOCHROME1", WindowCenter=100.5, WindowWidth=101, **RESCALE)
    np.testing.assert_allclose(_grey(data, (1, 4))[0], 255 - WINDOWED)


@needs_pydicom
def test_dicom_first_of_several_windows_is_used() -> None:
    data = _dicom(STORED, WindowCenter=[100.5, 1000], WindowWidth=[101, 10], **RESCALE)
    np.testing.assert_allclose(_grey(data, (1, 4))[0], WINDOWED)


@needs_pydicom
@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("LINEAR_EXACT", [0, 102, 153, 255]),  # ramp from c - w/2 = 50 to c + w/2 = 150
        ("SIGMOID", np.rint(255 / (1 + np.exp(-4 * (np.array([20, 90, 110, 180]) - 100) / 100)))),
    ],
)
def test_dicom_voi_lut_functions(function: str, expected: list[float]) -> None:
    data = _dicom(STORED, WindowCenter=100, WindowWidth=100, VOILUTFunction=function, **RESCALE)
    np.testing.assert_allclose(_grey(data, (1, 4))[0], expected)


@needs_pydicom
def test_dicom_without_window_uses_min_max_of_signed_values() -> None:
    pixels = np.array([[-500, -480], [-440, -400]], dtype=np.int16)
    data = _dicom(pixels, RescaleSlope=1, RescaleIntercept=-1024)
    np.testing.assert_allclose(_grey(data, (2, 2)), [[0, 51], [153, 255]])


@needs_pydicom
def test_dicom_voi_lut_sequence_maps_modality_values() -> None:
    """A 12-bit VOI LUT from modality value 0: below it the first entry, past it the last."""
    ds = _dataset(np.array([[0, 1, 2, 3, 9]], dtype=np.uint16), RescaleSlope=1, RescaleIntercept=-1)
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 12]
    lut.LUTData = np.array([0, 100, 2000, 4095], dtype="<u2").tobytes()
    ds.VOILUTSequence = [lut]
    expected = np.rint(np.array([0, 0, 100, 2000, 4095]) / 4095 * 255)
    np.testing.assert_allclose(_grey(_dicom_bytes(ds), (1, 5))[0], expected)


@needs_pydicom
def test_dicom_palette_colour() -> None:
    ds = _dataset(np.array([[0, 1, 2]], dtype=np.uint8))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    tables = {"Red": [0, 65535, 32896], "Green": [65535, 0, 1000], "Blue": [0, 0, 65535]}
    for colour, entries in tables.items():
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [3, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.array(entries, dtype="<u2").tobytes())
    expected = np.rint(np.array(list(tables.values())).T / 65535 * 255)
    np.testing.assert_allclose(_levels(_dicom_bytes(ds), (1, 3))[0], expected)


@needs_pydicom
def test_dicom_rgb_and_size() -> None:
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0], pixels[1, 2] = (1, 2, 3), (250, 100, 7)
    decoded = decode_image(_dicom(pixels, "RGB"), (2, 3), *IDENTITY)
    assert (decoded.width, decoded.height) == (3, 2)
    got = (decoded.tensor * 255).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, pixels)


@needs_pydicom
def test_dicom_multi_frame_uses_the_first_frame() -> None:
    frames = np.stack([np.full((2, 3), 10, np.uint16), np.full((2, 3), 90, np.uint16)])
    frames[0, 0, 0] = 0
    frames[0, 1, 2] = 20
    data = _dicom(frames)
    np.testing.assert_allclose(_grey(data, (2, 3)), [[0, 128, 128], [128, 128, 255]])


@needs_pydicom
def test_dicom_is_found_by_name_when_it_has_no_preamble() -> None:
    data = _dicom_bytes(_dataset(STORED, preamble=False, WindowCenter=100.5, WindowWidth=101, **RESCALE))
    assert data[128:132] != b"DICM"
    np.testing.assert_allclose(_grey(data, (1, 4), name="s3://scans/CT/IM0001.DCM")[0], WINDOWED)
    np.testing.assert_allclose(_grey(data, (1, 4))[0], WINDOWED)  # and by its leading meta tag


@needs_pydicom
def test_dicom_compressed_with_rle_decodes() -> None:
    ds = _dataset(np.arange(64, dtype=np.uint16).reshape(8, 8) * 100)
    ds.compress(RLELossless)
    got = _grey(_dicom_bytes(ds), (8, 8))
    np.testing.assert_allclose(got.ravel(), np.rint(np.arange(64) / 63 * 255))


@needs_pydicom
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("no-pixels", "holds no image"),
        ("short-pixels", "less than expected"),
        ("jpeg-ls", "JPEG-LS"),
        ("huge", "over the limit"),
    ],
)
def test_dicom_failures_say_why(change: str, reason: str) -> None:
    ds = _dataset(np.arange(64, dtype=np.uint16).reshape(8, 8))
    if change == "no-pixels":
        del ds.PixelData
    elif change == "short-pixels":
        ds.PixelData = ds.PixelData[:50]
    elif change == "jpeg-ls":
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not a codestream"])
    else:
        ds.Rows = ds.Columns = 30_000
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(_dicom_bytes(ds), (8, 8), *IDENTITY)
    assert time.perf_counter() - started < 2.0


@needs_pydicom
def test_open_rgb_gives_the_full_dicom_image() -> None:
    image = open_rgb(_dicom(STORED, WindowCenter=100.5, WindowWidth=101, **RESCALE))
    assert image.mode == "RGB" and image.size == (4, 1)
    np.testing.assert_array_equal(np.asarray(image)[0, :, 1], WINDOWED)


@pytest.mark.parametrize("orientation", [1, 6])
def test_batched_pixels_normalise_exactly_like_decode_image(orientation: int) -> None:
    rng = np.random.default_rng(orientation)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = []
    for n in range(3):
        pixels = rng.integers(0, 256, size=(40 + 7 * n, 31 + 5 * n, 3), dtype=np.uint8)
        exif = Image.Exif()
        exif[0x0112] = orientation
        images.append(_encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes()))
    size = (24, 20)

    pixels = [decode_pixels(data, size) for data in images]
    batch = stack_pixels(pixels)
    normalised = normalise_batch(batch, mean, std)
    expected = torch.stack([decode_image(data, size, mean, std).tensor for data in images])

    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 24, 20)
    assert batch.is_contiguous(memory_format=torch.channels_last)  # what the engine feeds convolutions
    assert torch.equal(normalised, expected)
    assert [(p.width, p.height) for p in pixels] == [
        (decode_image(d, size, mean, std).width, decode_image(d, size, mean, std).height) for d in images
    ]


def test_normalise_batch_refuses_what_is_not_a_uint8_rgb_batch() -> None:
    with pytest.raises(ValueError, match="uint8 pixels"):
        normalise_batch(torch.zeros(2, 3, 4, 4), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="uint8 pixels"):
        normalise_batch(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 24, 20), (5, 224, 224), (2, 301, 517)])
def test_channels_last_normalisation_equals_the_plain_arithmetic(shape: tuple[int, int, int]) -> None:
    """The blocked CPU path (several blocks here, ending mid-image) gives the broadcast's very values."""
    b, h, w = shape
    generator = torch.Generator().manual_seed(h * w)
    nhwc = torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=generator)
    batch = nhwc.permute(0, 3, 1, 2)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    plain = batch.to(torch.float32).div(255.0)
    plain = plain.sub(torch.tensor(mean).view(1, 3, 1, 1)).div(torch.tensor(std).view(1, 3, 1, 1))

    normalised = normalise_batch(batch, mean, std)

    assert normalised.is_contiguous(memory_format=torch.channels_last)
    assert normalised.dtype == torch.float32 and normalised.shape == batch.shape
    assert torch.equal(normalised, plain)
    assert torch.equal(normalise_batch(batch.contiguous(), mean, std), plain)  # NCHW: the broadcast path
