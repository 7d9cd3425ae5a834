"""Calling a model at a snapshot of its parameters, without touching the model.

:func:`snapshot` copies a parameter or buffer (detached, cast to the measuring dtype; integer
buffers keep theirs); :class:`Bound` calls the model with a dict of such tensors
(``torch.func.functional_call``); :func:`module_mode` sets train/eval flags for one pass and
restores each submodule's own flag afterwards. Used by the data-set operators
(:mod:`tinysubspace.curvature.dataset_operator`) and the FSDP2 operator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.func import functional_call

__all__ = ["Bound", "module_mode", "snapshot"]


@contextlib.contextmanager
def module_mode(model: torch.nn.Module, train: bool) -> Iterator[None]:
    """Put every submodule in train or eval mode, then restore each one's own flag."""
    saved = [(module, module.training) for module in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag


class Bound:
    """``model`` called with the given parameters and buffers (``functional_call``)."""

    def __init__(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.model, self.state = model, state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.state, args, kwargs)


def snapshot(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A detached copy; floating tensors cast to ``dtype`` (integer buffers keep theirs)."""
    tensor = tensor.detach()
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype).clone()
    return tensor.to(device=device).clone()
