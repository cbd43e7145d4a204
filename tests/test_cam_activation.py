"""Maps are of the activation the network consumes, for every GAP + linear torchvision family.

For a head that is global average pooling + one linear layer, the spatial mean of the CAM map
before its ReLU must be the explained logit minus the head's bias, and the stored raw map must
be the ReLU of the head-weighted sum of the very tensor the pooling receives. The pooling
input is observed independently of the engine: a forward hook on the pooling module, or, where
the forward pools with a function (densenet, mobilenet_v2, shufflenet, mnasnet), a
``TorchFunctionMode`` that sees that call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from tests.torchvision_families import FAMILIES, GAP_LINEAR, family_images, family_model
from workers.cam import CamEngine


class _GlobalPoolInputs(TorchFunctionMode):
    """Records the input of every global average pooling done by a function call."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.adaptive_avg_pool2d or (
            func is torch.Tensor.mean and list(args[1] if len(args) > 1 else kwargs.get("dim", [])) == [2, 3]
        ):
            self.inputs.append(args[0].detach().clone())
        return func(*args, **kwargs)


@contextmanager
def pooling_input(model: nn.Module, pool: str | None) -> Iterator[list[torch.Tensor]]:
    """The tensors the global pooling receives during the forwards run inside the block."""
    if pool is None:
        with _GlobalPoolInputs() as mode:
            yield mode.inputs
        return
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(pool).register_forward_hook(
        lambda module, args, output: seen.append(args[0].detach().clone())
    )
    try:
        yield seen
    finally:
        handle.remove()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((actual - expected).abs() / expected.abs().clamp_min(1e-12)).max())


@pytest.mark.parametrize("family", GAP_LINEAR)
def test_cam_mean_is_logit_minus_bias_and_raw_is_the_pooled_activation(family: str) -> None:
    spec = FAMILIES[family]
    model = family_model(family)
    images = family_images(family)
    result = CamEngine(model, layers=[spec.layer], methods=["cam"])(images, targets="topk:2")
    head = model.get_submodule(spec.head)
    assert isinstance(head, nn.Linear)
    assert result.logits is not None
    classes = result.targets
    explained = result.logits.double().gather(1, classes) - head.bias.detach().double()[classes]
    mean = result.unrectified["cam"][spec.layer].double().mean(dim=(2, 3))
    assert _relative_error(mean, explained) <= 1e-4, (mean, explained)

    with torch.no_grad(), pooling_input(model, spec.pool) as pooled:
        logits = model(images)
    torch.testing.assert_close(logits, result.logits, rtol=1e-5, atol=1e-5)
    activation = pooled[-1].double()
    expected = torch.einsum("nkc,nchw->nkhw", head.weight.detach().double()[classes], activation).clamp_min(0)
    raw = result.raw["cam"][spec.layer].double()
    assert raw.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(
        result.raw["cam"][spec.layer], result.unrectified["cam"][spec.layer].clamp_min(0)
    )


class _InPlaceAfterLayer(nn.Module):
    """A feature layer whose output the forward changes in place twice before pooling."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 4)
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        if self.in_place:
            out.mul_(1.5)
            out = F.relu(out, inplace=True)
        else:
            out = F.relu(out * 1.5)
        return self.fc(out.mean(dim=(2, 3)))


def test_gradients_flow_through_later_in_place_operations() -> None:
    """Values are the consumed ones; gradients are d score / d layer output through the ops.

    The oracle is the same network written without in-place operations, differentiated by
    ordinary autograd; the engine must agree for every method, including the ones that weight
    by the gradient's mean (which differs from the gradient after the ReLU).
    """
    torch.manual_seed(0)
    in_place = _InPlaceAfterLayer(in_place=True).eval()
    with torch.no_grad():
        in_place.features[1].bias.normal_()
    images = torch.randn(3, 3, 8, 8)
    methods = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"]
    result = CamEngine(in_place, layers=["features"], methods=methods)(images)

    plain = _InPlaceAfterLayer(in_place=False).eval()
    plain.load_state_dict(in_place.state_dict())
    captured: list[torch.Tensor] = []
    plain.features.register_forward_hook(lambda module, args, output: captured.append(output))
    scores = plain(images).gather(1, result.targets).sum()
    (grads,) = torch.autograd.grad(scores, captured[0])
    consumed = F.relu(captured[0] * 1.5).detach()
    assert bool((captured[0] < 0).any()), "the test needs a ReLU that changes the output"
    expected_gradcam = torch.einsum("nc,nchw->nhw", grads.mean(dim=(2, 3)), consumed)
    expected_hirescam = (grads * consumed).sum(dim=1)
    torch.testing.assert_close(result.unrectified["gradcam"]["features"][:, 0], expected_gradcam)
    torch.testing.assert_close(result.unrectified["hirescam"]["features"][:, 0], expected_hirescam)
    assert not torch.allclose(  # what the clone of the un-rectified output used to give
        result.unrectified["gradcam"]["features"][:, 0],
        torch.einsum("nc,nchw->nhw", grads.mean(dim=(2, 3)), captured[0].detach()),
    )
    for method in methods:
        assert torch.isfinite(result.maps[method]).all(), method
