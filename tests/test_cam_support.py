"""Shared helpers for the CAM engine tests: small models and map comparisons."""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def class_targets(classes: torch.Tensor) -> list[ClassifierOutputTarget]:
    """The reference's target objects for the first target column of our result."""
    return [ClassifierOutputTarget(int(c)) for c in classes[:, 0]]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def map_agreement(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(Pearson correlation, max abs difference) of two maps; a constant pair correlates 1."""
    diff = float(np.abs(ours - ref).max())
    if ours.std() < 1e-6 and ref.std() < 1e-6:
        return 1.0, diff
    return pearson(ours, ref), diff


def assert_maps_match(ours: np.ndarray, ref: np.ndarray, *, corr: float = 0.999, atol: float = 0.01) -> None:
    """Every map pair of ``[B, H, W]`` arrays agrees to the project's parity thresholds."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    for index, (a, b) in enumerate(zip(ours, ref, strict=True)):
        r, diff = map_agreement(a, b)
        assert r >= corr and diff <= atol, f"map {index}: pearson {r:.5f}, max abs diff {diff:.4f}"


def reference_pipeline(projection: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The reference's post-processing (ReLU, min-max, resize, fuse one layer) of raw maps."""
    scaled = scale_cam_image(np.maximum(projection, 0), (size[1], size[0]))
    return scale_cam_image(scaled)


class TinyNet(nn.Module):
    """Conv features -> global average pooling -> linear: the shape CAM was defined for."""

    def __init__(self, classes: int = 5, width: int = 8, bias: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=bias),
            nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1, bias=bias),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 2, classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def small_vit(classes: int = 10) -> torchvision.models.VisionTransformer:
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=classes
    )
    # torchvision zero-initialises the ViT head, which makes every gradient and score zero.
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.eval()


def small_swin(classes: int = 10) -> torchvision.models.SwinTransformer:
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=[2, 2],
        num_classes=classes,
    ).eval()
