"""Forward hooks that capture target-layer outputs, and start gradient recording late.

Gradient CAMs need d(score)/d(activation) only; recording the autograd graph for the part of
the network *before* the first target layer is wasted work and memory. The forward therefore
runs under ``torch.no_grad()``; the first target layer's hook detaches its output, marks it as
requiring grad and switches grad mode on, so only the network after that layer is recorded.
The caller's ``no_grad`` block restores the grad mode when the forward ends.

Each hook hands the network a clone of the captured tensor: later in-place operations
(``out += identity`` after a batch-norm, in-place ReLUs) then cannot change the activation the
map is computed from, and autograd still differentiates with respect to the captured tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from workers.cam.errors import CamConfigError


def _hook(name: str, store: dict[str, torch.Tensor], track_grad: bool) -> Callable[..., torch.Tensor]:
    def hook(module: nn.Module, args: object, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise CamConfigError(
                f"layer {name!r} returns {type(output).__name__}, not a tensor; pick a module whose "
                "output is a feature map (its parent or one of its children)"
            )
        if name in store:
            raise CamConfigError(
                f"layer {name!r} runs more than once per forward (a shared module), so its activation "
                "is ambiguous; pick a module that runs once, e.g. its parent block"
            )
        if track_grad and not output.requires_grad:
            leaf = output.detach().requires_grad_()
            torch.set_grad_enabled(True)
            store[name] = leaf
            return leaf.clone()
        store[name] = output
        return output.clone()

    return hook


@contextmanager
def capture_layers(modules: dict[str, nn.Module], *, track_grad: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Capture each named module's output during the forward run inside the block.

    Yields the dict that the hooks fill; the hooks are removed when the block exits, also on
    exceptions.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(_hook(name, store, track_grad)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replace_output(module: nn.Module, make: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, ``module`` returns ``make(original_output)`` instead of its output."""

    def hook(mod: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        return make(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
