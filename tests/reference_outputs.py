"""Independent float64 references for the output-space curvature operators (GGN, Fisher).

Built on :class:`reference.FlatLoss` (one batch holding the whole data set, float64): the Jacobian
of all outputs by ``torch.autograd.functional.jacobian``, the output Hessians in closed form
(softmax cross-entropy: ``(diag p − p pᵀ)/N`` per example; mean-squared error: ``2 I/(N C)``),
checked against ``torch.autograd.functional.hessian`` of the loss in the outputs
(:func:`output_hessian`), and per-example gradients from the Jacobian of the per-example losses.

Nothing here imports tinysubspace.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from reference import FlatLoss

__all__ = ["closed_form_output_hessian", "jacobian", "output_hessian", "outputs",
           "per_example_gradients", "reference_ggn"]


def outputs(f: FlatLoss, theta: torch.Tensor | None = None) -> torch.Tensor:
    """The model's outputs ``(N, C)`` on the whole data set at ``θ``."""
    theta = f.theta0 if theta is None else theta
    return functional_call(f.model, {**f.fixed, **f.unflatten(theta)}, (f.inputs,))


def jacobian(f: FlatLoss) -> torch.Tensor:
    """``J = ∂ vec(z) / ∂θ``, ``(N C, p)``, by ``torch.autograd.functional.jacobian``."""
    return torch.autograd.functional.jacobian(lambda t: outputs(f, t).reshape(-1),
                                              f.theta0).detach()


def output_hessian(f: FlatLoss) -> torch.Tensor:
    """``∇²_z L`` of the mean loss in the outputs, ``(N C, N C)``, by autograd."""
    z = outputs(f).detach()
    return torch.autograd.functional.hessian(
        lambda flat: f.loss_fn(flat.reshape(z.shape), f.targets), z.reshape(-1)).detach()


def closed_form_output_hessian(f: FlatLoss, loss: str) -> torch.Tensor:
    """``∇²_z L`` in closed form: block-diagonal ``(diag p_i − p_i p_iᵀ)/N`` for cross-entropy,
    ``2 I / (N C)`` for mean-squared error."""
    z = outputs(f).detach()
    n, c = z.shape
    if loss == "mse":
        return 2.0 / (n * c) * torch.eye(n * c, dtype=z.dtype)
    p = torch.softmax(z, dim=1)
    blocks = [torch.diag(q) - torch.outer(q, q) for q in p]
    return torch.block_diag(*blocks) / n


def reference_ggn(f: FlatLoss, loss: str) -> torch.Tensor:
    """``G = Jᵀ ∇²_z L J`` (``p × p``, float64)."""
    J = jacobian(f)
    return J.T @ closed_form_output_hessian(f, loss) @ J


def per_example_gradients(f: FlatLoss, targets: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, p)``: row ``i`` is ``∇_θ loss_fn(z_i, y_i)`` of example ``i`` alone (``targets``
    replace the data set's)."""
    targets = f.targets if targets is None else targets

    def losses(theta: torch.Tensor) -> torch.Tensor:
        z = outputs(f, theta)
        return torch.stack([f.loss_fn(z[i:i + 1], targets[i:i + 1]) for i in range(len(z))])

    return torch.autograd.functional.jacobian(losses, f.theta0).detach()
