"""Forward hooks that capture target-layer outputs, and start gradient recording late.

Gradient CAMs need d(score)/d(activation) only; recording the autograd graph for the part of
the network *before* the first target layer is wasted work and memory. The forward therefore
runs under ``torch.no_grad()``; the first target layer's hook detaches its output, marks it as
requiring grad and switches grad mode on, so only the network after that layer is recorded.
The caller's ``no_grad`` block restores the grad mode when the forward ends.

A map explains the activation the rest of the network consumes. Forward code often changes a
layer's output in place after the layer returns it (torchvision's densenet rectifies
``features`` with ``F.relu(..., inplace=True)`` before pooling; a residual block adds
``out += identity`` to a batch-norm output). So the values are read from the very tensor the
network received, *after* the forward, as pytorch-grad-cam's hooks effectively do. Gradients
are taken with respect to the layer's output as the layer returned it, through those in-place
operations: when gradients are recorded the hook hands the network a clone of that output, so
the in-place operations act on the clone (recorded by autograd as ordinary ops, version
counters intact) and the captured tensor itself is never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from workers.cam.errors import CamConfigError


@dataclass(frozen=True)
class Capture:
    """One layer's output during a forward.

    ``output``: the tensor the layer returned, untouched; gradients are taken with respect to
    it. ``consumed``: the tensor the rest of the network received; read after the forward it
    holds the values downstream layers actually used (later in-place operations included).
    """

    output: torch.Tensor
    consumed: torch.Tensor

    def values(self) -> torch.Tensor:
        """The activation the network consumed, detached from any graph."""
        return self.consumed.detach()


def _hook(name: str, store: dict[str, Capture], track_grad: bool) -> Callable[..., torch.Tensor | None]:
    def hook(module: nn.Module, args: object, output: object) -> torch.Tensor | None:
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
        if not track_grad:
            store[name] = Capture(output, output)
            return None
        if not output.requires_grad:
            output = output.detach().requires_grad_()
            torch.set_grad_enabled(True)
        # A leaf that requires grad may not be modified in place, and a later in-place op on
        # the output itself would move its autograd history: hand the network a clone.
        consumed = output.clone()
        store[name] = Capture(output, consumed)
        return consumed

    return hook


@contextmanager
def capture_layers(modules: dict[str, nn.Module], *, track_grad: bool) -> Iterator[dict[str, Capture]]:
    """Capture each named module's output during the forward run inside the block.

    Yields the dict that the hooks fill; the hooks are removed when the block exits, also on
    exceptions.
    """
    store: dict[str, Capture] = {}
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
