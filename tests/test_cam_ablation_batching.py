"""Ablation-CAM runs its ablated rows in chunks that span images, with the same numbers as
running every row on its own image copy (the reference's way)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.test_cam_support import seeded
from workers.cam import CamEngine


class Plain(nn.Module):
    """Nothing after ``features`` reads what came before it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        # no ReLU: no channel sits at the ablation value, so every (image, channel) pair runs
        self.features = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(4, 5)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.features(self.stem(x)).mean(dim=(2, 3)))


class Skip(Plain):
    """The head also reads the stem's output, around ``features``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        stem = self.stem(x)
        return self.head((self.features(stem) + stem).mean(dim=(2, 3)))


def _maps(model: Plain, images: torch.Tensor, mode: str | None) -> tuple[torch.Tensor, str, int]:
    engine = CamEngine(model, layers=["features"], methods=["ablationcam"], amp=False, score_batch_size=6)
    if mode is not None:
        engine._ablation_modes["features"] = mode
    model.calls = 0
    result = engine(images, targets=torch.tensor([[1, 3]] * images.shape[0]))
    return result.maps["ablationcam"], engine._ablation_modes["features"], model.calls


@pytest.mark.parametrize(("cls", "expected_mode"), [(Plain, "mixed"), (Skip, "broadcast")])
def test_chunks_span_images_and_match_one_copy_per_row(cls: type[Plain], expected_mode: str) -> None:
    seeded(5)
    model = cls().eval()
    images = torch.randn(3, 3, 10, 10)
    maps, mode, calls = _maps(model, images, None)
    copies, _, _ = _maps(model, images, "copies")
    assert mode == expected_mode
    torch.testing.assert_close(maps, copies, rtol=1e-5, atol=1e-6)
    assert maps.amax() > 0
    if expected_mode == "mixed":
        # 3 images x 4 channels = 12 rows in chunks of 6: the main forward and 2 ablation
        # forwards (one image at a time would take 3)
        assert calls == 1 + 2
    else:
        # the main forward, the failed mixed try (twice: the masked forward retries a failure
        # with contiguous input), then one forward per image of each chunk: (0,0,0,0,1,1) and
        # (1,1,2,2,2,2)
        assert calls == 1 + 2 + 2 + 2


def test_under_bf16_the_score_drops_are_taken_in_float32() -> None:
    """A drop is a difference of nearly equal scores: with the drops taken in bf16 this resnet18's
    raw maps peaked at 0.82-0.96x float32's; taken in float32 from the activations the bf16 pass
    captured, they stay within a percent."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def raw(amp: str | bool) -> torch.Tensor:
        engine = CamEngine(model, layers=["layer4"], methods=["ablationcam"], amp=amp, score_batch_size=128)
        return engine(images, targets=torch.tensor([3, 7])).raw["ablationcam"]["layer4"].float()

    reference, mixed = raw(False), raw("bf16")
    scale = mixed.flatten(1).abs().amax(dim=1) / reference.flatten(1).abs().amax(dim=1)
    assert torch.allclose(scale, torch.ones_like(scale), atol=0.01), scale
    assert torch.allclose(mixed, reference, rtol=0.05, atol=0.02 * float(reference.abs().max()))
