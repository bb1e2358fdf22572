"""``eval_mode``: evaluate a model in eval mode, then give it back in the mode it was in.

Evaluation runs in the middle of training (SDFT's regression gates), so
it must not leave a training model in eval mode, or the reverse; eval mode matters for
LoRA adapter dropout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block; restore each submodule's own mode after it."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training
