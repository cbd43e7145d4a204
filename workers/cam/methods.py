"""The CAM methods: each is a small function of activations (and gradients), nothing more.

The engine owns hooks, batching, autocast, upsampling and normalisation; a method here only
turns float32 ``A`` ``[N, C, h, w]`` (and ``G = d score / d A``, same shape) into a map
``[N, h, w]`` *before* ReLU, with the same operations, constants and order as the numeric
reference (pytorch-grad-cam) so maps agree to float32 rounding.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.cam.eigen import first_component
from workers.cam.errors import CamConfigError, unknown_name


class Kind(enum.Enum):
    GRADIENT = "gradient"  # needs d score / d A: one backward from the score to the layer
    ACTIVATION = "activation"  # activations alone, target independent
    HEAD = "head"  # GAP + linear head weights, no backward
    PERTURBATION = "perturbation"  # extra masked / ablated forwards


GradientFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ActivationFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    kind: Kind
    gradient: GradientFn | None = None
    activation: ActivationFn | None = None


def _spatial_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=(2, 3))


def weighted_sum(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """sum_c w[n, c] * A[n, c] -> [N, h, w]."""
    return torch.einsum("nc,nchw->nhw", weights, acts)


def gradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return weighted_sum(grads.mean(dim=(2, 3)), acts)


def gradcam_plus_plus(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    grads_2 = grads * grads
    grads_3 = grads_2 * grads
    sum_acts = _spatial_sum(acts)[:, :, None, None]
    alpha = grads_2 / (2 * grads_2 + sum_acts * grads_3 + 1e-6)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return weighted_sum(_spatial_sum(grads.clamp_min(0) * alpha), acts)


def xgradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    sum_acts = _spatial_sum(acts)[:, :, None, None]
    return weighted_sum(_spatial_sum(grads * acts / (sum_acts + 1e-7)), acts)


def hirescam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return (grads * acts).sum(dim=1)


def gradcam_elementwise(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return (grads * acts).clamp_min(0).sum(dim=1)


def layercam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return (grads.clamp_min(0) * acts).sum(dim=1)


def eigengradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return first_component(grads * acts)


def eigencam(acts: torch.Tensor) -> torch.Tensor:
    return first_component(acts)


_REGISTRY: dict[str, Method] = {
    method.name: method
    for method in (
        Method("cam", Kind.HEAD),
        Method("gradcam", Kind.GRADIENT, gradient=gradcam),
        Method("gradcam++", Kind.GRADIENT, gradient=gradcam_plus_plus),
        Method("xgradcam", Kind.GRADIENT, gradient=xgradcam),
        Method("hirescam", Kind.GRADIENT, gradient=hirescam),
        Method("gradcam-elementwise", Kind.GRADIENT, gradient=gradcam_elementwise),
        Method("layercam", Kind.GRADIENT, gradient=layercam),
        Method("eigencam", Kind.ACTIVATION, activation=eigencam),
        Method("eigengradcam", Kind.GRADIENT, gradient=eigengradcam),
        Method("scorecam", Kind.PERTURBATION),
        Method("ablationcam", Kind.PERTURBATION),
    )
}

METHODS: tuple[str, ...] = tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The method called ``name``; unknown names list the closest valid ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise unknown_name("method", str(name), METHODS)
    return _REGISTRY[name]


def parse_methods(names: str | list[str] | tuple[str, ...]) -> list[Method]:
    """Validated methods in the given order, duplicates dropped."""
    if isinstance(names, str):
        names = [names]
    methods = [get_method(name) for name in dict.fromkeys(names)]
    if not methods:
        raise CamConfigError(f"no methods given; choose from {', '.join(METHODS)}")
    return methods
