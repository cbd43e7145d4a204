"""JPEG decoding on the device: the same pixels as the CPU path, a per-file fallback, the choice.

No GPU is needed: torchvision's ``decode_jpeg`` takes the same batch list on the CPU (libjpeg-turbo,
the decoder Pillow uses), so everything the device path does after decoding (Pillow's resize
arithmetic, EXIF turns, crop and pad) is checked here pixel for pixel against
``decode_pixels``, and a whole shard through the device path against the CPU path, byte for byte.
On a GPU only nvJPEG's own decoding differs (bench/device_check.py measures by how much).
"""

from __future__ import annotations

import dataclasses
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from schema.settings import Settings
from tests.shard_support import comparable, cpu_settings, objects, shard_work
from workers import device_decode, shard
from workers.device_decode import DecodeChoice, calibrate, choose, decided, decode_on_device, prepare_jpeg
from workers.images import DecodedPixels, decode_pixels, stack_pixels
from workers.preprocess import Preprocess
from workers.shard import WorkItem
from workers.tensor_resize import RESAMPLE, pillow_order, resize

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
PREPROCESS = {
    "stretch-bilinear": Preprocess(size=(64, 64), mean=MEAN, std=STD),
    "crop-bicubic": Preprocess(
        size=(56, 56), mean=MEAN, std=STD, resize="center-crop", interpolation="bicubic"
    ),
    "letterbox": Preprocess(size=(48, 64), mean=MEAN, std=STD, resize="letterbox", fill=(10, 20, 30)),
    "crop-lanczos": Preprocess(
        size=(40, 40), mean=MEAN, std=STD, resize="center-crop", resize_to=(50, 50), interpolation="lanczos"
    ),
}


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields with edges: what JPEG is made for, with chroma to upsample."""
    rng = np.random.default_rng(seed)
    small = (rng.random((max(2, height // 12), max(2, width // 12), 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


def _jpeg(pixels: np.ndarray, *, orientation: int = 1, grey: bool = False, **options) -> bytes:
    img = Image.fromarray(pixels)
    if grey:
        img = img.convert("L")
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    img.save(buf, "JPEG", quality=options.pop("quality", 90), exif=exif, **options)
    return buf.getvalue()


def _files() -> dict[str, bytes]:
    photo = _photo(150, 110)
    files = {
        "baseline-420": _jpeg(photo),
        "baseline-444": _jpeg(photo, subsampling=0),
        "progressive": _jpeg(photo, progressive=True),
        "grey": _jpeg(photo, grey=True),
        "small-upscaled": _jpeg(_photo(31, 23, seed=1)),
    }
    for turn in range(2, 9):
        files[f"exif-{turn}"] = _jpeg(_photo(120, 90, seed=turn), orientation=turn)
    return files


@pytest.mark.parametrize("interpolation", list(RESAMPLE))
def test_tensor_resize_is_pillows_resize(interpolation: str) -> None:
    rng = np.random.default_rng(7)
    for (w, h), size in [
        ((150, 110), (64, 47)),
        ((31, 23), (70, 90)),
        ((90, 120), (33, 120)),
        ((64, 64), (50, 80)),
    ]:
        image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        want = np.asarray(Image.fromarray(image).resize(size, RESAMPLE[interpolation]))
        order = pillow_order((w, h), size, interpolation)
        assert order is not None
        got = resize(torch.from_numpy(image).permute(2, 0, 1), size, interpolation, order=order)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), want), (w, h, size)


@pytest.mark.parametrize("name", PREPROCESS)
def test_batched_decode_jpeg_gives_the_cpu_paths_pixels(name: str) -> None:
    pre = PREPROCESS[name]
    files = _files()
    pending = {key: prepare_jpeg(data, pre, max_pixels=10**8) for key, data in files.items()}
    assert all(p is not None for p in pending.values()), [k for k, p in pending.items() if p is None]
    calls: list[int] = []

    def decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        calls.append(len(tensors))
        return device_decode.torchvision_decode(tensors, device)

    decoded = decode_on_device(list(pending.values()), pre, torch.device("cpu"), decode)  # type: ignore[arg-type]
    assert calls == [len(files)]  # one batched call for the whole list
    for (key, data), got in zip(files.items(), decoded, strict=True):
        want = decode_pixels(data, pre)
        assert got is not None, key
        assert (got.width, got.height, got.transform) == (want.width, want.height, want.transform), key
        assert torch.equal(got.pixels, want.pixels), (
            f"{key}: {(got.pixels != want.pixels).float().mean():.4f}"
        )


def test_files_the_device_path_cannot_match_stay_on_the_cpu() -> None:
    pre = PREPROCESS["stretch-bilinear"]
    photo = _photo(150, 110)
    cmyk = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(cmyk, "JPEG")
    png = io.BytesIO()
    Image.fromarray(photo).save(png, "PNG")
    good = _jpeg(photo)
    refused = {
        "cmyk": cmyk.getvalue(),
        "png": png.getvalue(),
        "truncated": good[: len(good) // 2],
        "over-max-pixels": good,
        # four times the resize on both sides: the CPU decodes it at a reduced DCT scale
        "drafted": _jpeg(_photo(64 * 4, 64 * 4)),
    }
    for key, data in refused.items():
        limit = 1000 if key == "over-max-pixels" else 10**8
        assert prepare_jpeg(data, pre, max_pixels=limit) is None, key
    assert prepare_jpeg(good, pre, max_pixels=10**8) is not None


def test_a_refused_file_costs_only_itself() -> None:
    pre = PREPROCESS["crop-bicubic"]
    files = list(_files().values())[:5]
    pending = [prepare_jpeg(data, pre, max_pixels=10**8) for data in files]
    odd = bytes(pending[2].data)  # type: ignore[union-attr]
    calls: list[int] = []

    def decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        calls.append(len(tensors))
        if any(bytes(t.numpy()) == odd for t in tensors):
            raise RuntimeError("nvjpegDecodeBatchedPhaseOne failed: 6")  # not a CUDA error: a refusal
        return device_decode.torchvision_decode(tensors, device)

    decoded = decode_on_device(pending, pre, torch.device("cpu"), decode)  # type: ignore[arg-type]
    assert calls == [5, 1, 1, 1, 1, 1]  # the batch, then file by file
    assert [d is None for d in decoded] == [False, False, True, False, False]
    for data, got in zip(files, decoded, strict=True):
        if got is not None:
            assert torch.equal(got.pixels, decode_pixels(data, pre).pixels)


def test_a_cuda_error_is_not_taken_for_a_refusal() -> None:
    pre = PREPROCESS["stretch-bilinear"]
    pending = [prepare_jpeg(_jpeg(_photo(80, 60)), pre, max_pixels=10**8)]

    def broken(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="CUDA error"):
        decode_on_device(pending, pre, torch.device("cpu"), broken)  # type: ignore[arg-type]


def test_place_tensor_is_place() -> None:
    rng = np.random.default_rng(3)
    for pre in PREPROCESS.values():
        for w, h in ((100, 40), (30, 90), (64, 64)):
            geometry = pre.transform(w, h)
            image = (rng.random((geometry.resized[1], geometry.resized[0], 3)) * 255).astype(np.uint8)
            want = np.asarray(pre.place(Image.fromarray(image), geometry))
            got = pre.place_tensor(torch.from_numpy(image).permute(2, 0, 1), geometry)
            assert np.array_equal(got.permute(1, 2, 0).numpy(), want)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("cpu_s", "device_s", "on_device"), [(5.0, 2.0, True), (2.0, 5.0, False), (3.0, 3.0, False)]
)
def test_calibration_keeps_the_faster(cpu_s: float, device_s: float, on_device: bool) -> None:
    clock = _Clock()
    device_calls: list[float] = []

    def run_cpu() -> None:
        clock.now += cpu_s

    def run_device() -> None:
        # the first call (nvJPEG's setup) is slow and must not count
        clock.now += 100.0 if not device_calls else device_s
        device_calls.append(clock.now)

    choice = calibrate(run_cpu, run_device, files=10, threads=4, rounds=2, clock=clock)
    assert choice.on_device is on_device
    assert len(device_calls) == 3
    assert choice.device_ms == pytest.approx(1e3 * device_s / 10)
    assert choice.cpu_ms == pytest.approx(1e3 * cpu_s / 10)
    assert "4 CPU threads" in choice.reason and "10 JPEGs" in choice.reason


def test_choose_takes_the_best_round() -> None:
    assert choose(cpu_s=0.2, device_s=0.1, files=64, threads=16).on_device
    assert not choose(cpu_s=0.1, device_s=0.2, files=64, threads=16).on_device


def test_where_decoding_happens_by_device_and_mode() -> None:
    device_decode.forget()
    cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
    for mode in ("auto", "on", "off"):
        assert decided(mode, cpu).on_device is False  # type: ignore[union-attr]
    assert decided("on", gpu).on_device is True  # type: ignore[union-attr]
    assert decided("off", gpu).on_device is False  # type: ignore[union-attr]
    assert decided("auto", gpu) is None  # not measured yet
    kept = device_decode.remember(gpu, DecodeChoice(True, "measured"))
    assert decided("auto", gpu) is kept
    assert device_decode.remember(gpu, DecodeChoice(False, "again")) is kept  # first measurement wins
    assert decided("auto", torch.device("cuda:1")) is None
    device_decode.forget()


def test_the_setting_is_validated_before_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAMAUDIT_DEVICE_DECODE", raising=False)
    # the CPU's libjpeg-turbo unless asked: nvJPEG's pixels differ, so maps would follow the timing
    assert Settings().device_decode == "off"
    assert Settings(device_decode="ON").device_decode == "on"
    with pytest.raises(ValidationError, match=r"auto, on, off.*'gpu'"):
        Settings(device_decode="gpu")
    monkeypatch.setenv("CAMAUDIT_DEVICE_DECODE", "aut")
    with pytest.raises(ValidationError, match="did you mean 'auto'"):
        Settings()
    with pytest.raises(ValueError, match="must be one of"):
        device_decode.parse_mode("yes")


def test_stack_moves_cpu_fallbacks_to_the_device_of_the_others() -> None:
    transform = PREPROCESS["stretch-bilinear"].transform(8, 8)
    on_cpu = DecodedPixels(torch.zeros(64, 64, 3, dtype=torch.uint8), 8, 8, transform)
    elsewhere = DecodedPixels(torch.zeros(64, 64, 3, dtype=torch.uint8, device="meta"), 8, 8, transform)
    assert stack_pixels([on_cpu, elsewhere]).device.type == "meta"
    assert stack_pixels([on_cpu, on_cpu]).device.type == "cpu"


def _jpeg_work(tmp_path: Path, out: str) -> shard.ShardWork:
    """The support module's shard, its PNGs re-encoded as JPEGs (one CMYK, one broken)."""
    work = shard_work(tmp_path, 7, batch_size=3, out=out, target_spec="topk:2", overlay=True)
    folder = tmp_path / "jpeg"
    folder.mkdir(exist_ok=True)
    items = []
    for n, item in enumerate(work.items):
        target = folder / (Path(item.source_uri).stem + ".jpg")
        if not target.exists():
            try:
                img = Image.open(item.source_uri).convert("CMYK" if n == 1 else "RGB")
                img.save(target, "JPEG", quality=92)
            except OSError:
                target.write_bytes(b"\xff\xd8\xff broken")
        items.append(WorkItem(id=item.id, source_uri=str(target), label=None))
    return dataclasses.replace(work, items=items, source_roots=[str(folder)])


@pytest.mark.slow
def test_a_shard_decoded_on_the_device_path_equals_the_cpu_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole shard through the device path (on the CPU, one file refused): same rows, same bytes."""
    settings = cpu_settings()
    cpu_rows = shard.compute_shard(_jpeg_work(tmp_path, "cpu"), settings)
    refused: list[int] = []
    real = device_decode.torchvision_decode

    def decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        if len(tensors) == 1 and not refused:
            refused.append(1)
            raise RuntimeError("nvjpeg: unsupported JPEG")
        if len(tensors) > 1 and not refused:
            raise RuntimeError("nvjpeg batch failed")  # then file by file: the first one is refused
        return real(tensors, device)

    monkeypatch.setattr(device_decode, "torchvision_decode", decode)
    monkeypatch.setattr(shard, "decided", lambda mode, device: DecodeChoice(True, "forced for the test"))
    seen: list[torch.device] = []
    real_decode_on_device = shard.decode_on_device

    def counting(pending, pre, device, *args):
        seen.extend([device] * len(pending))
        return real_decode_on_device(pending, pre, device, *args)

    monkeypatch.setattr(shard, "decode_on_device", counting)
    device_rows = shard.compute_shard(_jpeg_work(tmp_path, "device"), settings)
    assert len(seen) == 6 and refused  # 8 items: one CMYK and one broken stay on the CPU; one refused
    assert comparable(device_rows) == comparable(cpu_rows)
    assert objects(tmp_path / "device") == objects(tmp_path / "cpu")
    failed = [row for row in device_rows.items if row.get("error")]
    assert len(failed) == 1 and "JPEG" in failed[0]["error"]


@pytest.mark.parametrize("device_refuses", [False, True])
def test_auto_measures_the_first_batch_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device_refuses: bool
) -> None:
    """On CUDA in auto mode: the first batch's JPEGs timed both ways (simulated clock), kept after."""
    device_decode.forget()
    clock = _Clock()
    calls: list[int] = []
    real_decode_pixels = shard.decode_pixels

    ticking = threading.Lock()

    def cpu_decode(*args, **kwargs):
        with ticking:  # called on the decode pool's threads
            clock.now += 0.005  # 5 ms per image on the CPU pool
        return real_decode_pixels(*args, **kwargs)

    def device_decode_fake(pending, pre, device, *args):
        calls.append(len(pending))
        clock.now += 0.001 * len(pending)  # 1 ms per image on the device
        return [None if device_refuses else real_decode_pixels(p.data, pre) for p in pending]

    monkeypatch.setattr(shard, "decode_pixels", cpu_decode)
    monkeypatch.setattr(shard, "decode_on_device", device_decode_fake)
    monkeypatch.setattr(shard, "calibrate", lambda *a, **k: calibrate(*a, **k, clock=clock))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    work = dataclasses.replace(_jpeg_work(tmp_path, "auto"), batch_size=4)
    gpu = torch.device("cuda:0")
    auto = cpu_settings().model_copy(update={"device_decode": "auto"})
    sizes = shard.pool_sizes(auto, remote_storage=False)
    choice = shard._decode_choice(work, auto, gpu, sizes)
    if device_refuses:
        assert not choice.on_device and "refused 2 of 2" in choice.reason
        assert calls == [2]  # the check call only: nothing timed
    else:
        # 2 JPEGs in the first 4 items (one is CMYK, one broken): a check, a warm-up, two timed rounds
        assert choice.on_device and calls == [2, 2, 2, 2]
        assert choice.device_ms == pytest.approx(1.0) and choice.cpu_ms == pytest.approx(5.0, rel=0.01)
    assert shard._decode_choice(work, auto, gpu, sizes) is choice  # measured once
    assert len(calls) == (1 if device_refuses else 4)
    device_decode.forget()
