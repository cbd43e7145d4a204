"""One small, random-weight member of every torchvision classifier family, for engine tests.

Each entry names the layer a user would explain (the last feature map before the head), an
input size small enough for the CPU yet leaving that layer a grid of at least 2 x 2, the
reshape pytorch-grad-cam needs for it, and, for heads that are global average pooling + one
linear layer, where the pooled activation can be observed independently of the engine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torchvision
from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform
from torch import nn
from torchvision.models import convnext, swin_transformer

from tests.test_cam_support import seeded, small_swin, small_vit


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    layer: str
    size: int
    # GAP + linear head: (name of the pooling module, or None when the forward pools with a
    # function such as F.adaptive_avg_pool2d or Tensor.mean), and the name of the linear head.
    pool: str | None = None
    head: str | None = None
    reference_reshape: Callable[[torch.Tensor], torch.Tensor] | None = None
    # the layer emits tokens or channels-last grids: the reference ablates with AblationLayerVit
    tokens: bool = False
    # seconds per engine + reference run on a 2-core CPU: marked slow
    heavy: bool = False
    # Input side for Score-CAM and Ablation-CAM, which run one forward per channel of the layer
    # (hundreds to thousands), so their cost grows with the input's area. What they add to the
    # gradient methods (the masked or ablated forwards, their batching, the token ablation
    # layer) does not depend on the grid's size: the smallest input whose grid keeps its parity
    # and at least 2 x 2 (3 x 3 where it is odd) is enough. The gradient methods keep ``size``.
    # None: ``size`` (a grid that small already, or a family not yet checked at a smaller input).
    perturbation_size: int | None = None
    # The perturbation methods held to the reference on this family. What Score-CAM adds to the
    # capture (masks from the activations, upsampled to the input, one forward each) does not
    # depend on the network, so it runs on the families whose activations differ in kind
    # (tokens, channels-last grids, heads that are not GAP + linear) and the small CNNs, not on
    # the large CNNs, where it costs 20-120 s each: their capture is held to the reference by
    # the gradient methods and by Ablation-CAM, whose forward from the ablated layer to the
    # output does depend on the network. Inception v3 repeats GoogLeNet's structure after its
    # layer (concatenated branches, pooling, dropout, linear) at twice the channels.
    perturbation: tuple[str, ...] = ("scorecam", "ablationcam")

    def param(self, name: str) -> object:
        """``name`` as a pytest parameter, marked slow for heavy families."""
        return pytest.param(name, marks=pytest.mark.slow) if self.heavy else name

    @property
    def gap_linear(self) -> bool:
        return self.head is not None


def _swin_v2() -> nn.Module:
    return swin_transformer.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=[2, 2],
        num_classes=10,
        block=swin_transformer.SwinTransformerBlockV2,
        downsample_layer=swin_transformer.PatchMergingV2,
    )


def _convnext() -> nn.Module:
    settings = [
        convnext.CNBlockConfig(16, 32, 1),
        convnext.CNBlockConfig(32, 64, 1),
        convnext.CNBlockConfig(64, None, 1),
    ]
    # layer_scale 1 (not 1e-6): with random weights the blocks would otherwise be identities
    return convnext.ConvNeXt(settings, layer_scale=1.0, num_classes=10)


def _maxvit() -> nn.Module:
    return torchvision.models.MaxVit(
        input_size=(64, 64),
        stem_channels=16,
        partition_size=2,
        block_channels=[16, 32],
        block_layers=[1, 1],
        head_dim=8,
        stochastic_depth_prob=0.0,
        num_classes=10,
    )


def _fan_in_convolutions(model: nn.Module) -> nn.Module:
    """He-initialised convolutions: the small-std initialisation of googlenet, inception and
    shufflenet (PyTorch's default) makes random-weight activations vanish through the depth,
    leaving logits that differ from the head bias only in float32 rounding."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    return model


def _channels_last_to_grid(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)


M = torchvision.models
ABLATION_ONLY = ("ablationcam",)
FAMILIES: dict[str, Family] = {
    "alexnet": Family(
        lambda: M.alexnet(num_classes=10), "features.11", 128, heavy=True, perturbation_size=64
    ),
    "vgg": Family(lambda: M.vgg11(num_classes=10), "features.19", 64, heavy=True, perturbation_size=32),
    "squeezenet": Family(lambda: M.squeezenet1_1(num_classes=10), "features", 96, perturbation_size=56),
    "resnet": Family(lambda: M.resnet18(num_classes=10), "layer4", 64, pool="avgpool", head="fc"),
    "resnext": Family(
        lambda: M.ResNet(M.resnet.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=8, num_classes=10),
        "layer4",
        64,
        pool="avgpool",
        head="fc",
    ),
    "densenet": Family(
        lambda: M.densenet121(num_classes=10),
        "features",
        64,
        head="classifier",
        perturbation=ABLATION_ONLY,
    ),
    "googlenet": Family(
        lambda: _fan_in_convolutions(M.googlenet(num_classes=10, aux_logits=False, init_weights=False)),
        "inception5b",
        96,
        pool="avgpool",
        head="fc",
        heavy=True,
        perturbation=ABLATION_ONLY,
    ),
    "inception_v3": Family(
        lambda: _fan_in_convolutions(M.inception_v3(num_classes=10, aux_logits=False, init_weights=False)),
        "Mixed_7c",
        128,
        pool="avgpool",
        head="fc",
        heavy=True,
        perturbation=(),
    ),
    "shufflenet_v2": Family(
        lambda: _fan_in_convolutions(M.shufflenet_v2_x0_5(num_classes=10)),
        "conv5",
        96,
        head="fc",
    ),
    "mobilenet_v2": Family(
        lambda: M.mobilenet_v2(num_classes=10),
        "features",
        96,
        head="classifier.1",
        perturbation=ABLATION_ONLY,
    ),
    # mobilenet_v3's head is Linear -> Hardswish -> Linear after the pooling: not GAP + linear
    "mobilenet_v3": Family(lambda: M.mobilenet_v3_small(num_classes=10), "features", 96),
    "mnasnet": Family(lambda: M.mnasnet0_5(num_classes=10), "layers", 96, head="classifier.1"),
    "efficientnet": Family(
        lambda: M.efficientnet_b0(num_classes=10),
        "features",
        96,
        pool="avgpool",
        head="classifier.1",
        perturbation=ABLATION_ONLY,
    ),
    "efficientnet_v2": Family(
        lambda: M.efficientnet_v2_s(num_classes=10),
        "features",
        96,
        pool="avgpool",
        head="classifier.1",
        heavy=True,
        perturbation=ABLATION_ONLY,
    ),
    "regnet": Family(
        lambda: M.regnet_y_400mf(num_classes=10),
        "trunk_output",
        96,
        pool="avgpool",
        head="fc",
    ),
    # convnext and maxvit normalise the pooled features before their linear layer
    "convnext": Family(_convnext, "features", 96),
    "maxvit": Family(_maxvit, "blocks.1", 64),
    "vit": Family(
        small_vit,
        "encoder.layers.encoder_layer_1.ln_1",
        32,
        reference_reshape=functools.partial(vit_reshape_transform, height=4, width=4),
        tokens=True,
    ),
    "swin": Family(small_swin, "norm", 32, reference_reshape=_channels_last_to_grid, tokens=True),
    "swin_v2": Family(_swin_v2, "norm", 32, reference_reshape=_channels_last_to_grid, tokens=True),
}

GAP_LINEAR = [family.param(name) for name, family in FAMILIES.items() if family.gap_linear]
ALL = [family.param(name) for name, family in FAMILIES.items()]
PERTURBED = [(name, method) for name, family in FAMILIES.items() for method in family.perturbation]


@functools.cache
def family_model(name: str) -> nn.Module:
    """The family's model, random weights (seeded), eval mode; built once per test session."""
    seeded(0)
    return FAMILIES[name].build().eval()


def family_images(name: str, batch: int = 2, seed: int = 1, *, perturbation: bool = False) -> torch.Tensor:
    """Random images at the family's size, or at its ``perturbation_size`` for Score-/Ablation-CAM."""
    seeded(seed)
    spec = FAMILIES[name]
    size = (spec.perturbation_size or spec.size) if perturbation else spec.size
    return torch.randn(batch, 3, size, size)
