"""Leave the caller's model exactly as it was found.

The engine needs eval mode (batch-norm statistics and dropout must not depend on the batch,
or a map of one image would depend on the others), but the caller may be in the middle of
training; every module's flag is put back, also when the call raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Switch ``model`` to eval for the block; restore each module's mode and the grad mode."""
    modes = [(module, module.training) for module in model.modules()]
    grad_enabled = torch.is_grad_enabled()
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        torch.set_grad_enabled(grad_enabled)
