"""Preprocessing equals the model's own transform, and boxes map back to source pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision import models as tvm

from workers.images import (
    ImageDecodeError,
    decode_image,
    decode_pixels,
    normalise_batch,
    normalise_by_table,
    normalise_table,
    stack_pixels,
)
from workers.preprocess import RESIZE_MODES, Preprocess, PreprocessError, parse_mode
from workers.zoo import timm_models, tv_weights

# (width, height): landscape, portrait, square, odd, smaller than the crop (upsampled), a 3:1 strip
SIZES = [(300, 200), (200, 300), (224, 224), (517, 333), (97, 61), (640, 213), (1000, 800)]


def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: every resampling filter has something to do.
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / max(1, width - 1), ys * 255 / max(1, height - 1), (xs + ys) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _ours(data: bytes, pre: Preprocess) -> torch.Tensor:
    decoded = decode_pixels(data, pre)
    return normalise_batch(stack_pixels([decoded]), pre.mean, pre.std)[0]


def _assert_bit_exact(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    diff = (ours - theirs).abs()
    assert torch.equal(ours, theirs), f"{int((diff > 0).sum())} values differ, max {float(diff.max())}"


TV_WEIGHTS = [
    tvm.ResNet18_Weights.IMAGENET1K_V1,  # 256 -> 224 bilinear
    tvm.ResNet50_Weights.IMAGENET1K_V2,  # 232 -> 224 bilinear
    tvm.EfficientNet_B0_Weights.IMAGENET1K_V1,  # 256 -> 224 bicubic
    tvm.Inception_V3_Weights.IMAGENET1K_V1,  # 342 -> 299 bilinear
    tvm.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1,  # 384 -> 384 bicubic: resize only
]


@pytest.mark.parametrize("weights", TV_WEIGHTS, ids=lambda w: f"{type(w).__name__}.{w.name}")
def test_torchvision_weight_transforms_are_reproduced_bit_for_bit(weights: object) -> None:
    pre = tv_weights.preprocess_of(weights)
    assert pre.resize == "center-crop"
    reference = weights.transforms()  # type: ignore[attr-defined]
    for n, (width, height) in enumerate(SIZES):
        data = _png(width, height, n)
        theirs = reference(Image.open(io.BytesIO(data)).convert("RGB"))
        _assert_bit_exact(_ours(data, pre), theirs)
        # The single-image path gives the same floats as the batched one.
        assert torch.equal(decode_image(data, pre, pre.mean, pre.std).tensor, theirs)


TIMM_CONFIGS = [
    ("resnet18", {}),  # 0.875 -> 256, bilinear
    ("resnet50.a1_in1k", {}),  # 0.95, bicubic
    ("vit_tiny_patch16_224", {}),  # 0.9, bicubic, mean 0.5
    ("resnet18", {"crop_mode": "squash", "crop_pct": 0.9}),
    ("resnet18", {"crop_mode": "border", "crop_pct": 1.0}),
    ("resnet18", {"crop_mode": "border", "crop_pct": 0.9}),
    ("resnet18", {"input_size": (3, 160, 224)}),  # non-square: ResizeKeepRatio, then crop
    ("resnet18", {"input_size": (3, 160, 224), "crop_mode": "border"}),
]


@pytest.mark.parametrize(("name", "overrides"), TIMM_CONFIGS, ids=lambda v: str(v))
def test_timm_eval_transforms_are_reproduced_bit_for_bit(name: str, overrides: dict[str, object]) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=2)
    config = resolve_data_config(overrides, model=model)
    pre = timm_models.preprocess_of(config)
    reference = create_transform(**config)
    for n, (width, height) in enumerate(SIZES):
        data = _png(width, height, 10 + n)
        theirs = reference(Image.open(io.BytesIO(data)).convert("RGB"))
        _assert_bit_exact(_ours(data, pre), theirs)


def test_large_sources_are_exact_and_jpeg_drafts_stay_within_a_stated_tolerance() -> None:
    """A large PNG is resized in full (exact); a JPEG over twice the resize size is decoded at a
    reduced DCT scale for speed, so its floats are close to the reference but not equal."""
    weights = tvm.ResNet18_Weights.IMAGENET1K_V1
    pre = tv_weights.preprocess_of(weights)
    reference = weights.transforms()
    big = _png(1900, 1700, 99)
    _assert_bit_exact(_ours(big, pre), reference(Image.open(io.BytesIO(big)).convert("RGB")))
    buffer = io.BytesIO()
    Image.open(io.BytesIO(big)).save(buffer, format="JPEG", quality=95)
    jpeg = buffer.getvalue()
    theirs = reference(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    levels = ((_ours(jpeg, pre) - theirs) * torch.tensor(pre.std).view(3, 1, 1) * 255).abs()
    assert 0 < float(levels.mean()) < 2.0, float(levels.mean())


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("source", [(300, 200), (200, 300), (97, 61), (224, 224)])
def test_boxes_round_trip_between_source_and_input_pixels(mode: str, source: tuple[int, int]) -> None:
    pre = Preprocess(size=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3).with_overrides(resize=mode)
    geometry = pre.transform(*source)
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 1, (50, 4)) * np.array([*source, *source])
    boxes = np.concatenate(
        [np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])], 1
    )
    np.testing.assert_allclose(geometry.to_source(geometry.to_input(boxes)), boxes, rtol=0, atol=1e-9)
    # The whole visible source lands exactly on the input's content area.
    visible = geometry.to_input(np.array(geometry.visible_source()))
    np.testing.assert_allclose(visible, np.array(geometry.content_input(), dtype=np.float64), atol=1e-9)


def test_the_geometry_is_where_the_pixels_actually_go() -> None:
    """A white square in the source lands, through each mode, where the transform says."""
    source = np.zeros((200, 400, 3), dtype=np.uint8)
    source[50:150, 250:350] = 255  # x 250..350, y 50..150
    buffer = io.BytesIO()
    Image.fromarray(source).save(buffer, format="PNG")
    for mode in RESIZE_MODES:
        pre = Preprocess(size=(100, 100), mean=(0.0,) * 3, std=(1.0,) * 3).with_overrides(resize=mode)
        decoded = decode_pixels(buffer.getvalue(), pre)
        x0, y0, x1, y1 = decoded.transform.to_input([250, 50, 350, 150]).round().astype(int)
        grey = decoded.pixels[..., 0].numpy()
        inside = grey[y0 + 1 : y1 - 1, max(0, x0 + 1) : min(100, x1) - 1]
        assert inside.size and inside.min() > 200, mode
        outside = grey.copy()
        outside[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = 0
        assert outside.max() < 60, mode


def test_modes_differ_as_their_names_say() -> None:
    pre = Preprocess(size=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
    stretch = pre.transform(448, 224)
    assert stretch.resized == (224, 224) and stretch.offset == (0, 0)
    crop = pre.with_overrides(resize="center-crop").transform(448, 224)
    assert crop.resized == (512, 256) and crop.offset == (-144, -16)  # 0.875: shorter side 256
    assert crop.visible_source() == (
        144 * 448 / 512,
        16 * 224 / 256,
        (144 + 224) * 448 / 512,
        240 * 224 / 256,
    )
    assert crop.clips([0, 100, 40, 120]) and not crop.clips([200, 100, 240, 120])
    box = pre.with_overrides(resize="letterbox").transform(448, 224)
    assert box.resized == (224, 112) and box.offset == (0, 56) and box.content_input() == (0, 56, 224, 168)
    assert box.visible_source() == (0.0, 0.0, 448.0, 224.0)
    assert pre.with_overrides(resize="letterbox").fill == (128, 128, 128)


def test_overrides_keep_the_crop_fraction_and_the_record_round_trips() -> None:
    pre = tv_weights.preprocess_of(tvm.ResNet50_Weights.IMAGENET1K_V2)  # 232 -> 224
    assert pre.as_dict()["crop_pct"] == 224 / 232 and pre.resize_to == (232, 232)
    bigger = pre.with_overrides(size=(448, 448))
    assert bigger.resize_to == (464, 464) and bigger.resize == "center-crop"
    assert pre.with_overrides(resize="stretch").fit == (224, 224)  # the whole source
    assert pre.with_overrides(resize="stretch", crop_pct=0.5).fit == (448, 448)
    for candidate in (
        pre,
        bigger,
        pre.with_overrides(resize="letterbox"),
        Preprocess((8, 9), (0, 0, 0), (1, 1, 1)),
    ):
        assert Preprocess.from_dict(candidate.as_dict()) == candidate
    old = {"size": [96, 64], "mean": [0.5] * 3, "std": [0.25] * 3, "resize": "stretch"}
    assert Preprocess.from_dict(old) == Preprocess((96, 64), (0.5,) * 3, (0.25,) * 3)


def test_bad_preprocessing_names_say_what_is_valid() -> None:
    with pytest.raises(PreprocessError, match="did you mean center-crop"):
        parse_mode("center-crap")
    with pytest.raises(PreprocessError, match=r"\(0, 1\]"):
        parse_mode("center-crop:1.5")
    assert parse_mode("centre-crop:0.9") == ("center-crop", 0.9)
    with pytest.raises(PreprocessError, match="did you mean bicubic"):
        Preprocess((8, 8), (0, 0, 0), (1, 1, 1), interpolation="bicubik")


def test_the_device_table_holds_exactly_the_values_the_cpu_arithmetic_gives() -> None:
    """Accelerators gather from the table; it must equal torchvision's arithmetic level by level."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    cpu = normalise_batch(levels, mean, std)
    reference = tvm.ResNet18_Weights.IMAGENET1K_V1.transforms().__class__(crop_size=16, resize_size=16)
    assert torch.equal(cpu[0], reference(levels[0]))
    table = torch.from_numpy(normalise_table(mean, std))
    assert torch.equal(table, cpu[0].reshape(3, 256))
    batch = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # channels-last
    gathered = normalise_by_table(batch, mean, std)
    assert torch.equal(gathered, normalise_batch(batch, mean, std))
    assert gathered.is_contiguous(memory_format=torch.channels_last)


def test_a_centre_crop_of_an_extreme_strip_fails_its_item_instead_of_resizing_to_billions() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (20_000, 2)).save(buffer, format="PNG")
    pre = Preprocess((224, 224), (0.5,) * 3, (0.5,) * 3).with_overrides(resize="center-crop")
    with pytest.raises(ImageDecodeError, match=r"resized to 2560000x256 .* needs stretch or letterbox"):
        decode_pixels(buffer.getvalue(), pre)
    assert decode_pixels(buffer.getvalue(), pre.with_overrides(resize="letterbox")).pixels.shape == (
        224,
        224,
        3,
    )
