"""CAM proper: the map of every class is one product of the features with the head weights.

That only holds for a head that is global average pooling followed by one ``nn.Linear`` that
produces the model output, fed by *this* layer. It is verified once per layer with a probe
forward: some ``nn.Linear`` must produce the model output, and its input must equal the
spatial mean of the layer's (layout-adjusted) output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from workers.cam.errors import CamConfigError
from workers.cam.layout import Layout


def find_gap_linear_head(model: nn.Module, layer: str, layout: Layout, sample: torch.Tensor) -> nn.Linear:
    """The ``nn.Linear`` that maps GAP(layer output) to the model output, else CamConfigError."""
    layer_module = model.get_submodule(layer)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    captured: list[torch.Tensor] = []

    def keep_layer(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured.append(output)

    def keep_linear(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen.setdefault(name, (args[0], output))

        return hook

    handles = [layer_module.register_forward_hook(keep_layer)]
    handles += [
        module.register_forward_hook(keep_linear(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with torch.inference_mode():
            output = model(sample)
    finally:
        for handle in handles:
            handle.remove()
    advice = "use 'gradcam' (on the last layer before pooling it equals CAM up to scale)"
    producers = [
        name
        for name, (_, out) in seen.items()
        if isinstance(output, torch.Tensor) and (out is output or torch.equal(out, output))
    ]
    if not producers:
        raise CamConfigError(
            "cam needs a head that ends in global average pooling + one nn.Linear producing the model "
            f"output; no nn.Linear output is the model output here; {advice}"
        )
    grid = layout.to_grid(captured[0]).float()
    pooled = grid.mean(dim=(2, 3))
    for name in producers:
        head_input = seen[name][0].float()
        if head_input.shape == pooled.shape:
            tolerance = 1e-5 * max(1.0, float(pooled.abs().max()))
            if torch.allclose(head_input, pooled, rtol=1e-4, atol=tolerance):
                head = model.get_submodule(name)
                assert isinstance(head, nn.Linear)
                return head
    raise CamConfigError(
        f"cam needs layer {layer!r} to feed global average pooling + the linear head directly, but the "
        f"head {producers[0]!r} is fed by something other than the spatial mean of {layer!r}; pick the "
        f"last feature layer before the pooling, or {advice}"
    )


def head_maps(head: nn.Linear, acts: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Raw CAM ``[N, K, h, w]`` for classes ``[N, K]``: ``sum_c W[k, c] * A[c]``.

    On this scale the spatial mean of the pre-ReLU map is the class logit minus the head bias;
    Grad-CAM's raw map on the same layer is this divided by ``h * w``.
    """
    weight = head.weight.detach().float()
    return torch.einsum("nkc,nchw->nkhw", weight[classes], acts)
