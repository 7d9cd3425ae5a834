"""Independent float64 references for the curvature operator (STYLE.md point 4).

The loss is written as a plain function of one flat parameter vector ``θ`` and evaluated on the
*whole* data set in one batch (so the operator's batch weighting is checked, not copied). Its
Hessian comes from ``torch.autograd.functional.hessian`` — deliberately not
``torch.func.hessian``, which in torch 2.13 is wrong for an affine ``nn.LayerNorm``; and the
reference itself is checked against central finite differences of the gradient
(:func:`finite_difference_hessian`).

Nothing here imports tinysubspace.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import functional_call

__all__ = [
    "FlatLoss",
    "finite_difference_gradient",
    "finite_difference_hessian",
    "reference_gradient",
    "reference_hessian",
    "relative_error",
]


class FlatLoss:
    """``L(θ)``: the mean loss over ``(inputs, targets)`` as a function of a flat float64 ``θ``.

    Args:
        model: the model (copied and cast to float64; the original is not touched).
        loss_fn: mean-reduced ``loss_fn(outputs, targets)``.
        inputs, targets: the whole data set, one batch.
        names: parameters that make up ``θ`` (``named_parameters()`` order); ``None``: all that
            require grad.
        train: evaluate the copy in train mode (default eval).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                 inputs: torch.Tensor, targets: torch.Tensor,
                 names: Sequence[str] | None = None, train: bool = False) -> None:
        self.model = copy.deepcopy(model).to(torch.float64).train(train)
        self.loss_fn = loss_fn
        self.inputs = inputs.to(torch.float64)
        self.targets = targets.to(torch.float64) if targets.is_floating_point() else targets
        named = dict(self.model.named_parameters())
        if names is None:
            names = [name for name, p in named.items() if p.requires_grad]
        self.names = list(names)
        self.shapes = [named[name].shape for name in self.names]
        self.theta0 = torch.cat([named[name].detach().reshape(-1) for name in self.names])
        self.fixed = {name: p.detach() for name, p in named.items() if name not in self.names}

    @property
    def size(self) -> int:
        return int(self.theta0.numel())

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            count = int(torch.Size(shape).numel())
            pieces[name] = theta[start:start + count].reshape(shape)
            start += count
        return pieces

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        state = {**self.fixed, **self.unflatten(theta)}
        outputs = functional_call(self.model, state, (self.inputs,))
        return self.loss_fn(outputs, self.targets)


def reference_gradient(f: FlatLoss, theta: torch.Tensor | None = None) -> torch.Tensor:
    """``∇L(θ)`` by one backward pass (float64)."""
    theta = (f.theta0 if theta is None else theta).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(f(theta), theta)
    return grad.detach()


def reference_hessian(f: FlatLoss, theta: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``∇²L(θ)`` (``p × p``, float64) by ``torch.autograd.functional.hessian``."""
    theta = (f.theta0 if theta is None else theta).detach().clone()
    return torch.autograd.functional.hessian(f, theta).detach()


def finite_difference_gradient(f: FlatLoss, step: float = 1e-6) -> torch.Tensor:
    """``∇L`` by central differences of ``L`` (error ``O(step²)``)."""
    theta = f.theta0
    out = torch.empty_like(theta)
    with torch.no_grad():
        for i in range(theta.numel()):
            e = torch.zeros_like(theta)
            e[i] = step
            out[i] = (f(theta + e) - f(theta - e)) / (2 * step)
    return out


def finite_difference_hessian(f: FlatLoss, step: float = 1e-5) -> torch.Tensor:
    """``∇²L`` by central differences of the gradient, column by column (not symmetrised)."""
    theta = f.theta0
    columns = []
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = step
        columns.append((reference_gradient(f, theta + e) - reference_gradient(f, theta - e))
                       / (2 * step))
    return torch.stack(columns, dim=1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖actual − expected‖ / ‖expected‖`` (Frobenius), with the same dtype for both."""
    actual = actual.to(expected.dtype)
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))
