"""Target forms: top-1, explicit classes, top-k, all classes, callables, and their errors."""

from __future__ import annotations

import pytest
import torch
from pytorch_grad_cam import GradCAM
from torch import nn

from tests.test_cam_support import TinyNet, assert_maps_match, seeded
from workers.cam import CamConfigError, CamEngine
from workers.cam.targets import class_indices, parse_targets

METHODS = ["gradcam", "cam", "eigencam", "scorecam", "ablationcam"]


@pytest.fixture(scope="module")
def model() -> TinyNet:
    seeded(3)
    return TinyNet(classes=5).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    seeded(4)
    return torch.randn(3, 3, 12, 12)


def test_default_target_is_top1(model: TinyNet, images: torch.Tensor) -> None:
    result = CamEngine(model, layers=["features"], methods=METHODS)(images)
    logits = model(images).detach()
    assert result.targets.dtype == torch.int64
    assert torch.equal(result.targets, logits.argmax(1, keepdim=True))
    torch.testing.assert_close(result.scores, logits.max(1, keepdim=True).values)
    torch.testing.assert_close(result.logits, logits)
    for name in METHODS:
        assert result.maps[name].shape == (3, 1, 12, 12)
        assert result.maps[name].dtype == torch.float32
        assert float(result.maps[name].min()) >= 0.0
        assert float(result.maps[name].max()) <= 1.0
        assert result.raw[name]["features"].shape == (3, 1, 6, 6)


@pytest.mark.parametrize("spec", ["topk:3", "all", "explicit"])
def test_many_targets_share_one_call_and_equal_single_target_maps(
    model: TinyNet, images: torch.Tensor, spec: str
) -> None:
    engine = CamEngine(model, layers=["features"], methods=METHODS)
    logits = model(images).detach()
    if spec == "topk:3":
        expected = logits.topk(3, dim=1).indices
    elif spec == "all":
        expected = torch.arange(5).expand(3, 5)
    else:
        expected = torch.tensor([[4, 0], [1, 1], [2, 3]])
    result = engine(images, targets=expected if spec == "explicit" else spec)
    assert torch.equal(result.targets, expected)
    torch.testing.assert_close(result.scores, logits.gather(1, expected))
    for column in range(expected.shape[1]):
        single = engine(images, targets=expected[:, column])
        for name in METHODS:
            torch.testing.assert_close(result.maps[name][:, column : column + 1], single.maps[name])
            torch.testing.assert_close(
                result.raw[name]["features"][:, column : column + 1], single.raw[name]["features"]
            )


def test_inputs_made_under_inference_mode_are_accepted(model: TinyNet, images: torch.Tensor) -> None:
    with torch.inference_mode():
        frozen_images = images.clone()
        classes = model(frozen_images).argmax(dim=1)
    result = CamEngine(model, layers=["features"], methods=["gradcam", "scorecam"])(
        frozen_images, targets=classes
    )
    assert torch.equal(result.targets[:, 0], classes)
    assert not result.maps["gradcam"].is_inference()


def test_integer_lists_are_accepted(model: TinyNet, images: torch.Tensor) -> None:
    result = CamEngine(model, layers=["features"])(images, targets=[1, 2, 3])
    assert result.targets.tolist() == [[1], [2], [3]]


class SingleLogit(nn.Module):
    """A binary classifier with one logit: class targets make no sense, a callable does."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_callable_target_on_single_logit_model_matches_reference(images: torch.Tensor) -> None:
    seeded(5)
    model = SingleLogit().eval()
    result = CamEngine(model, layers=["features"], methods=["gradcam", "ablationcam"])(
        images, targets=lambda output: output[:, 0]
    )
    assert result.targets.tolist() == [[-1]] * 3
    torch.testing.assert_close(result.scores, model(images).detach())
    with GradCAM(model, [model.features]) as cam:
        reference = cam(images, targets=[lambda output: output[0]] * 3)
    assert_maps_match(result.maps["gradcam"][:, 0].numpy(), reference)


def test_fewer_targets_than_images_is_an_error(model: TinyNet, images: torch.Tensor) -> None:
    engine = CamEngine(model, layers=["features"])
    with pytest.raises(CamConfigError, match=r"targets for 2 images but the batch has 3"):
        engine(images, targets=torch.tensor([0, 1]))
    with pytest.raises(CamConfigError, match=r"targets for 2 images"):
        engine(images, targets=torch.tensor([[0, 1], [1, 2]]))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("top3", r"unknown target spec 'top3'.*'topk:N'"),
        ("topk:0", r"unknown target spec 'topk:0'"),
        ("topk:9", r"more classes than the model has \(5\)"),
        (torch.tensor([0.0, 1.0, 2.0]), r"integer tensor"),
        (torch.tensor([0, 5, 1]), r"class target 5 is out of range.*0\.\.4"),
        (torch.tensor([-2, 0, 1]), r"class target -2 is out of range"),
        (torch.tensor([-1, 0, 1]), r"image 0 of the batch has no class target"),
        (lambda output: output, r"one score per image"),
    ],
)
def test_bad_target_specs_say_what_would_be_right(
    model: TinyNet, images: torch.Tensor, spec: object, message: str
) -> None:
    with pytest.raises(CamConfigError, match=message):
        CamEngine(model, layers=["features"])(images, targets=spec)


def test_cam_with_callable_target_is_an_error(model: TinyNet, images: torch.Tensor) -> None:
    with pytest.raises(CamConfigError, match="needs class targets"):
        CamEngine(model, layers=["features"], methods=["cam"])(images, targets=lambda output: output[:, 0])


def test_class_targets_are_checked_on_the_host_without_reading_the_device() -> None:
    """Logits on the meta device have no values: any read back of the targets would raise."""
    logits = torch.empty(2, 5, device="meta")
    request = parse_targets(torch.tensor([[1, 4], [0, 2]]), 2)
    assert request.bounds == (0, 4)
    classes, valid = class_indices(request, logits)
    assert classes.device.type == "meta" and classes.shape == (2, 2) and valid.shape == (2, 2)
    with pytest.raises(CamConfigError, match="class target 5 is out of range"):
        class_indices(parse_targets(torch.tensor([1, 5]), 2), logits)
    with pytest.raises(CamConfigError, match="class target -2 is out of range"):
        class_indices(parse_targets([-2, 3], 2), logits)


def test_positive_explains_the_single_logit_of_a_binary_head(images: torch.Tensor) -> None:
    seeded(5)
    binary = TinyNet(classes=1).eval()
    result = CamEngine(binary, layers=["features"], methods=["gradcam", "cam"])(images, targets="positive")
    logit = binary(images).detach()
    assert torch.equal(result.targets, torch.zeros(3, 1, dtype=torch.long))
    torch.testing.assert_close(result.scores, logit)
    assert bool(result.valid.all())
    explained = logit - binary.fc.bias.detach()
    torch.testing.assert_close(result.unrectified["cam"]["features"].mean(dim=(2, 3)), explained)


def test_positive_rejects_a_head_with_several_outputs(model: TinyNet, images: torch.Tensor) -> None:
    with pytest.raises(CamConfigError, match="single logit of a binary head, but the model has 5 outputs"):
        CamEngine(model, layers=["features"], methods=["gradcam"])(images, targets="positive")


def test_above_picks_every_class_whose_sigmoid_passes(model: TinyNet, images: torch.Tensor) -> None:
    probs = torch.sigmoid(model(images).detach())
    threshold = float(probs.flatten().sort().values[probs.numel() // 2])  # about half pass
    result = CamEngine(model, layers=["features"], methods=["gradcam"])(images, targets=f"above:{threshold}")
    width = int((probs > threshold).sum(dim=1).max())
    assert result.targets.shape == (3, width)
    for row in range(3):
        expected = [int(c) for c in probs[row].argsort(descending=True) if probs[row, c] > threshold]
        chosen = result.targets[row][result.valid[row]].tolist()
        assert chosen == expected
        # padding repeats a real class of the image, so its map is an ordinary one
        assert set(result.targets[row].tolist()) <= set(expected or [int(probs[row].argmax())])
    capped = CamEngine(model, layers=["features"], methods=["gradcam"])(
        images, targets=f"above:{threshold}:1"
    )
    assert capped.targets.shape == (3, 1)
    assert torch.equal(capped.valid[:, 0], (probs > threshold).any(dim=1))


@pytest.mark.parametrize("spec", ["above:0", "above:1", "above:1.5", "above:-0.2", "above:half", "above:"])
def test_above_needs_a_probability_threshold(model: TinyNet, images: torch.Tensor, spec: str) -> None:
    with pytest.raises(CamConfigError, match="strictly between 0 and 1"):
        CamEngine(model, layers=["features"], methods=["gradcam"])(images, targets=spec)


def test_class_lists_of_different_lengths_are_padded(model: TinyNet, images: torch.Tensor) -> None:
    result = CamEngine(model, layers=["features"], methods=["gradcam"])(images, targets=[[1, 3], [4], [0, 2]])
    assert result.targets.tolist() == [[1, 3], [4, 4], [0, 2]]
    assert result.valid.tolist() == [[True, True], [True, False], [True, True]]
    alone = CamEngine(model, layers=["features"], methods=["gradcam"])(images[1:2], targets=[[4]])
    torch.testing.assert_close(result.maps["gradcam"][1, 1], alone.maps["gradcam"][0, 0])
    with pytest.raises(CamConfigError, match="image 1 of the batch has no class target"):
        CamEngine(model, layers=["features"], methods=["gradcam"])(images, targets=[[1], [], [2]])
