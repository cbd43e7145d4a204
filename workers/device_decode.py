"""Decoding JPEGs on the GPU (nvJPEG through torchvision), used when it beats the CPU.

A GPU worker explaining 2,000 images/s needs about 4 host cores just to decode ImageNet-sized
JPEGs with libjpeg-turbo (docs/PERFORMANCE.md). ``torchvision.io.decode_jpeg(list, device=cuda)``
decodes a whole batch on the device instead. Whether that is faster depends on the GPU, the host
cores and the files, so in ``auto`` mode a worker measures it once, on its first batch (the same
files decoded both ways, best of two rounds), and keeps the faster; ``on`` and ``off`` (the
default: the pixels differ, see below) force it. A CPU worker always decodes on the CPU.

The pixels go through the same preprocessing as the CPU path's: the geometry of
:meth:`Preprocess.transform`, Pillow's own resize arithmetic (workers/tensor_resize.py, exact)
and :meth:`Preprocess.place_tensor`. On the CPU torchvision's decoder (libjpeg-turbo) gives
Pillow's pixels exactly, so the only difference left on a GPU is nvJPEG's: its inverse DCT and
chroma upsampling are not libjpeg-turbo's: on an H200, 56 % of the levels differed, by 0.7 on
average and 10 at most (``bench/device_check.sh``).

Per file, the CPU path is kept where the device path would not give the same image or cannot
decode it: not a JPEG (or an MPO), not 8-bit RGB or grey (CMYK, YCCK), no end-of-image marker
(a truncated file: the CPU decoder says why it fails), a JPEG the CPU would decode at a reduced
DCT scale (sources four times the resize size and more; decoding them small on the CPU is cheap
anyway), more than ``MAX_DEVICE_PIXELS``, and a resize whose order of passes the installed
Pillow does not confirm. A file the device decoder refuses (progressive or odd files on some
nvJPEG backends) is decoded on the CPU instead; it never fails for that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from workers.cam.device_errors import is_device_error
from workers.images import DecodedPixels, apply_draft, identify, orientation
from workers.preprocess import ImageTransform, Preprocess
from workers.tensor_resize import pillow_order, resize

log = logging.getLogger("camaudit.worker")


def parse_mode(value: str) -> str:
    """``CAMAUDIT_DEVICE_DECODE`` checked as the settings check it (auto, on, off)."""
    from schema.settings import parse_device_decode  # pydantic: imported only when a mode is parsed

    return parse_device_decode(value)


JPEG_START = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
MAX_DEVICE_PIXELS = 40_000_000  # per image: a 40 MP photo is 120 MB as RGB on the device
CHUNK_PIXELS = 256_000_000  # per decode call: bounds the device memory of one call to ~0.8 GB
_UPRIGHT_TURNS = (5, 6, 7, 8)


@dataclass(frozen=True)
class PendingJpeg:
    """A JPEG whose header a decode thread has read; its pixels are decoded on the device with its batch."""

    data: bytes
    width: int  # upright source size
    height: int
    orientation: int  # EXIF 1..8
    transform: ImageTransform
    order: str  # the order of Pillow's resize passes for this geometry


def prepare_jpeg(data: bytes, pre: Preprocess, *, max_pixels: int) -> PendingJpeg | None:
    """The header of a JPEG the device can decode to the CPU path's pixels, or None (decode on the CPU).

    Never raises: any file it cannot vouch for goes to the CPU path, which gives the reason
    when the file is bad.
    """
    if not data.startswith(JPEG_START) or not data.rstrip(b"\x00\r\n ").endswith(JPEG_END):
        return None
    try:
        img = identify(data, max_pixels)
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        stored_w, stored_h = img.size
        if stored_w * stored_h > MAX_DEVICE_PIXELS:
            return None
        turn = orientation(img)
        width, height = (stored_h, stored_w) if turn in _UPRIGHT_TURNS else (stored_w, stored_h)
        apply_draft(img, lambda w, h: pre.transform(w, h).resized)
        if img.size != (stored_w, stored_h):
            return None  # the CPU decodes it at a reduced DCT scale: other pixels, and cheap anyway
        geometry = pre.transform(width, height)
        new_w, new_h = geometry.resized
        if new_w * new_h > max_pixels:
            return None
        stored_size = (new_h, new_w) if turn in _UPRIGHT_TURNS else (new_w, new_h)
        order = pillow_order((stored_w, stored_h), stored_size, pre.interpolation)
    except Exception:
        return None
    if order is None:
        return None
    return PendingJpeg(data, width, height, turn, geometry, order)


def _upright(chw: torch.Tensor, turn: int) -> torch.Tensor:
    """PIL's ``Image.transpose`` for each EXIF orientation, on a [C, H, W] tensor."""
    if turn == 2:
        return chw.flip(-1)
    if turn == 3:
        return chw.flip(-1, -2)
    if turn == 4:
        return chw.flip(-2)
    if turn == 5:
        return chw.transpose(-1, -2)
    if turn == 6:
        return torch.rot90(chw, -1, (-2, -1))
    if turn == 7:
        return chw.transpose(-1, -2).flip(-1, -2)
    if turn == 8:
        return torch.rot90(chw, 1, (-2, -1))
    return chw


def finish_pixels(chw: torch.Tensor, pending: PendingJpeg, pre: Preprocess) -> DecodedPixels:
    """Decoded uint8 [3, H, W] (stored orientation) -> the model input, exactly as decode_pixels does it.

    Resize in stored orientation, then turn the small result, then crop or pad: the order of
    :func:`workers.images.decode_pixels`.
    """
    new_w, new_h = pending.transform.resized
    turned = pending.orientation in _UPRIGHT_TURNS
    stored_size = (new_h, new_w) if turned else (new_w, new_h)
    small = resize(chw, stored_size, pre.interpolation, order=pending.order)
    placed = pre.place_tensor(_upright(small, pending.orientation), pending.transform)
    return DecodedPixels(
        pixels=placed.permute(1, 2, 0),
        width=pending.width,
        height=pending.height,
        transform=pending.transform,
    )


DecodeJpegs = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def torchvision_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One batched ``decode_jpeg`` call: uint8 [3, H, W] per file, on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if len(data) == 1:  # one file: the single-tensor call, which every torchvision has
        return [decode_jpeg(data[0], mode=ImageReadMode.RGB, device=device)]
    out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)  # a list: torchvision >= 0.19
    return list(out) if isinstance(out, list | tuple) else [out]


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _chunks(pending: Sequence[PendingJpeg]) -> list[list[int]]:
    """Indices in groups whose decoded pixels stay under ``CHUNK_PIXELS``."""
    groups: list[list[int]] = [[]]
    pixels = 0
    for i, item in enumerate(pending):
        size = item.width * item.height
        if groups[-1] and pixels + size > CHUNK_PIXELS:
            groups.append([])
            pixels = 0
        groups[-1].append(i)
        pixels += size
    return [g for g in groups if g]


def decode_on_device(
    pending: Sequence[PendingJpeg],
    pre: Preprocess,
    device: torch.device,
    decode: DecodeJpegs | None = None,
) -> list[DecodedPixels | None]:
    """Batched device decoding; None for each file the device decoder refused (decode it on the CPU).

    A batch call that fails is retried file by file, so one odd file costs only itself. Out of
    device memory is a refusal too (the CPU decodes those files); a CUDA error is raised: the
    worker's context is unusable from then on.
    """
    decode = decode or torchvision_decode
    out: list[DecodedPixels | None] = [None] * len(pending)
    for group in _chunks(pending):
        tensors = [_as_tensor(pending[i].data) for i in group]
        try:
            decoded: list[torch.Tensor | None] = list(decode(tensors, device))
            if len(decoded) != len(group):
                raise RuntimeError(f"the decoder returned {len(decoded)} images for {len(group)} files")
        except Exception as exc:
            if is_device_error(exc):
                raise
            decoded = []
            for tensor in tensors:
                try:
                    decoded.append(decode([tensor], device)[0])
                except Exception as one:
                    if is_device_error(one):
                        raise
                    decoded.append(None)
        for i, chw in zip(group, decoded, strict=True):
            item = pending[i]
            turned = item.orientation in _UPRIGHT_TURNS
            stored = (item.width, item.height) if not turned else (item.height, item.width)
            if chw is None or chw.dim() != 3 or tuple(chw.shape) != (3, stored[1], stored[0]):
                continue  # refused, or not the size its header declares: the CPU path decides
            out[i] = finish_pixels(chw, item, pre)
    return out


# --- choosing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeChoice:
    """Where a worker decodes JPEGs, and why (logged, and shown by the device check)."""

    on_device: bool
    reason: str
    cpu_ms: float | None = None  # per image, measured
    device_ms: float | None = None

    @property
    def where(self) -> str:
        return "device" if self.on_device else "cpu"


def choose(cpu_s: float, device_s: float, files: int, threads: int) -> DecodeChoice:
    """The faster of two measured wall times for the same files; a tie keeps the CPU (no device time)."""
    cpu_ms, device_ms = 1e3 * cpu_s / files, 1e3 * device_s / files
    faster = device_s < cpu_s
    reason = (
        f"auto: {device_ms:.2f} ms/image on the device against {cpu_ms:.2f} on {threads} CPU threads, "
        f"{files} JPEGs of the first batch"
    )
    return DecodeChoice(faster, reason, cpu_ms, device_ms)


def calibrate(
    run_cpu: Callable[[], object],
    run_device: Callable[[], object],
    files: int,
    threads: int,
    *,
    rounds: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> DecodeChoice:
    """Time both decoders on the same files (after one untimed device call: nvJPEG's setup) and choose.

    ``run_device`` must return only once its pixels exist (it synchronises the device).
    """
    run_device()
    cpu_s = device_s = float("inf")
    for _ in range(rounds):
        start = clock()
        run_cpu()
        cpu_s = min(cpu_s, clock() - start)
        start = clock()
        run_device()
        device_s = min(device_s, clock() - start)
    return choose(cpu_s, device_s, files, threads)


_choices: dict[str, DecodeChoice] = {}
_lock = threading.Lock()


def decided(mode: str, device: torch.device) -> DecodeChoice | None:
    """The choice for this process and device, or None when ``auto`` has not measured yet."""
    if device.type != "cuda":
        return DecodeChoice(False, f"the model runs on {device.type}: JPEGs are decoded on the CPU")
    if mode == "off":
        return DecodeChoice(False, "CAMAUDIT_DEVICE_DECODE=off")
    if mode == "on":
        return DecodeChoice(True, "CAMAUDIT_DEVICE_DECODE=on")
    with _lock:
        return _choices.get(str(device))


def remember(device: torch.device, choice: DecodeChoice) -> DecodeChoice:
    """Keep an ``auto`` measurement for the rest of the process (one per worker child and device)."""
    with _lock:
        kept = _choices.setdefault(str(device), choice)
    if kept is choice:
        log.info(
            "JPEG decoding on %s: %s (%s)",
            device,
            "the device" if choice.on_device else "the CPU",
            choice.reason,
        )
    return kept


def forget() -> None:
    """Drop the measurements (tests)."""
    with _lock:
        _choices.clear()
