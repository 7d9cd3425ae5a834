"""The exact ways to compute ``∇²ℓ_j V`` for one batch: small strategy objects, one per method.

Each strategy is called as ``strategy(op, batch, index, block)`` with a
:class:`~tinysubspace.curvature.hessian.HessianOperator` (its measured parameter copies
``op._leaves``, their ``op.layout``, the batch loss ``op._batch_loss`` with a graph, and
``op._functional_loss`` for ``torch.func``) and returns the ``(p, b)`` block ``∇²ℓ_j V``.

``loop``: double backprop, the gradient graph built once per batch and one backward pass per
column (``retain_graph``). ``batched``: the same graph, one vmapped backward for the block
(``is_grads_batched``). ``jvp``: forward-over-reverse ``jvp(grad ℓ)`` vmapped over the columns
(``torch.func``; not in ``mode="train"`` with batch norm). ``auto``: ``jvp`` on a GPU in eval
mode (1.5× faster single products and 2.6× faster blocks than ``loop`` for ResNet-18 on an
H200), ``loop`` otherwise (on a CPU ``loop`` is as fast as any for blocks and the fastest for
single products). Timings: docs/performance.md.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

__all__ = ["HVP_METHODS", "HvpStrategy", "hvp_strategy", "resolve_hvp_method"]

HVP_METHODS = ("auto", "loop", "batched", "jvp")
"""Exact ways to compute ``∇²ℓ V`` (``op.hvp_method``); see the module docstring."""


class HvpStrategy(Protocol):
    def __call__(self, op: Any, batch: Any, index: int, block: torch.Tensor) -> torch.Tensor: ...


class DoubleBackward:
    """``∇(∇ℓ · v)`` through one gradient graph per batch: a backward per column (``batched``
    false) or one vmapped backward for the whole block (``batched`` true, ``b > 1``)."""

    def __init__(self, batched: bool) -> None:
        self.batched = batched

    def __call__(self, op: Any, batch: Any, index: int, block: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(block)
        b = block.shape[1]
        leaves = op._leaves
        with torch.enable_grad():
            loss = op._batch_loss(batch, index)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not live:  # the loss is at most linear in every parameter: zero curvature
                return out
            slices, shapes = op.layout.slices(), op.layout.shapes
            if self.batched and b > 1:  # one vmapped backward for the whole block
                directions = [block[slices[i]].T.reshape(b, *shapes[i]) for i in live]
                hv = torch.autograd.grad([grads[i] for i in live], leaves,
                                         grad_outputs=directions, is_grads_batched=True,
                                         allow_unused=True)
                for part, h in zip(slices, hv, strict=True):
                    if h is not None:
                        out[part] = h.reshape(b, -1).T
                return out
            for column in range(b):  # one backward per column through the retained graph
                directions = [block[slices[i], column].view(shapes[i]) for i in live]
                hv = torch.autograd.grad([grads[i] for i in live], leaves,
                                         grad_outputs=directions,
                                         retain_graph=column < b - 1,
                                         allow_unused=True)
                for part, h in zip(slices, hv, strict=True):
                    if h is not None:
                        out[part, column] = h.reshape(-1)
        return out


class ForwardOverReverse:
    """``jvp(grad ℓ_j)`` (``torch.func``), vmapped over the block's columns."""

    def __call__(self, op: Any, batch: Any, index: int, block: torch.Tensor) -> torch.Tensor:
        b = block.shape[1]
        primals = tuple(leaf.detach() for leaf in op._leaves)
        grad_fn = torch.func.grad(op._functional_loss(batch), argnums=tuple(range(len(primals))))
        tangents = tuple(block[part].T.reshape(b, *shape)
                         for part, shape in zip(op.layout.slices(), op.layout.shapes,
                                                strict=True))
        hv = torch.func.vmap(lambda *t: torch.func.jvp(grad_fn, primals, t)[1])(*tangents)
        return torch.cat([h.reshape(b, -1) for h in hv], 1).T


_STRATEGIES: dict[str, HvpStrategy] = {
    "loop": DoubleBackward(batched=False),
    "batched": DoubleBackward(batched=True),
    "jvp": ForwardOverReverse(),
}


def resolve_hvp_method(name: str, device: torch.device, mode: str) -> str:
    """The method ``name`` stands for (``auto`` resolved for ``device`` and ``mode``).

    Raises:
        ValueError: an unknown name (the known ones are listed).
    """
    if name not in HVP_METHODS:
        raise ValueError(f"hvp_method must be one of {HVP_METHODS}, got {name!r}")
    if name != "auto":
        return name
    return "jvp" if device.type == "cuda" and mode == "eval" else "loop"


def hvp_strategy(name: str, device: torch.device, mode: str) -> HvpStrategy:
    """The strategy object for ``name`` (see :func:`resolve_hvp_method`)."""
    return _STRATEGIES[resolve_hvp_method(name, device, mode)]
