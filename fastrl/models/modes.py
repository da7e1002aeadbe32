"""Switching a model to eval mode for a while and back, module by module."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (dropout off) inside the block; afterwards every submodule gets its OWN previous mode back.

    A plain ``model.train(was_training)`` would flip a submodule the caller keeps in eval (a frozen part,
    a reference tower) back into train mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
