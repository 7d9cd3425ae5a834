"""Products of the linearised network, ``Jᵀ M J V``: the shared engine of the GGN and Fisher.

For a batch ``B_j`` with outputs :math:`z = f(X_j; \\theta)` (``(n_j, C)``, flattened per example)
and the Jacobian :math:`J = \\partial z / \\partial \\theta`, every Gauss–Newton-type matrix of
the batch is :math:`J^T M J` for an output-space matrix ``M``: the Hessian of the batch loss in
its outputs :math:`\\nabla^2_z \\ell_j` for the generalised Gauss–Newton matrix
(:func:`output_hessian`), a sum of outer products of output gradients for a Fisher matrix. The
product never forms ``J``: per batch the outputs are computed once with their graph, and for each
column ``v`` of a block

1. ``J v`` by the double-backward trick: ``u ↦ Jᵀu`` is linear in a dummy ``u``, and
   :math:`J v = \\partial (J^T u \\cdot v) / \\partial u`;
2. ``w = M (J v)``;
3. ``Jᵀ w`` by one backward pass through the retained output graph.

These are functions of an operator's public interface (``op.leaves``, ``op.layout``,
``op.batch_outputs``, ``op.output_loss``) so that any
:class:`~tinysubspace.curvature.dataset_operator.DataSetOperator` composes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tinysubspace.curvature.data import Batch

__all__ = ["OutputCurvature", "linearized_product", "output_hessian"]

OutputCurvature = Callable[[torch.Tensor], torch.Tensor]
"""``w ↦ M w`` on the outputs of one batch (shape ``(n_j, C)`` in and out), where ``M`` is the
output-space curvature of the batch's *mean* loss (for the GGN, ``∇²_z ℓ_j``)."""

CurvatureOf = Callable[[torch.Tensor, Batch, int], OutputCurvature]
"""``(outputs, batch, index) ↦`` the batch's :data:`OutputCurvature`."""


def output_hessian(op: Any, outputs: torch.Tensor, batch: Batch, index: int) -> OutputCurvature:
    """``w ↦ ∇²_z ℓ_j w``, by double backprop of the batch loss in its outputs only (a
    ``C n_j``-dimensional problem; for cross-entropy ``(diag p_i − p_i p_iᵀ)/n_j`` per example,
    for mean-squared error ``2 I / (n_j C)``)."""
    z = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = op.output_loss(z, batch, index)
        (dz,) = torch.autograd.grad(loss, z, create_graph=True)
    if not dz.requires_grad:  # the loss is at most linear in the outputs
        return torch.zeros_like

    def apply(w: torch.Tensor) -> torch.Tensor:
        (hw,) = torch.autograd.grad(dz, z, grad_outputs=w, retain_graph=True, allow_unused=True)
        return torch.zeros_like(w) if hw is None else hw

    return apply


def linearized_product(op: Any, batch: Batch, index: int, block: torch.Tensor,
                       curvature_of: CurvatureOf) -> torch.Tensor:
    """``Jᵀ M J V`` for one batch (``(p, b)``), ``M = curvature_of(outputs, batch, index)``.

    Raises:
        TypeError: the model does not return a tensor with a batch dimension.
    """
    out = torch.zeros_like(block)
    leaves, slices, shapes = op.leaves, op.layout.slices(), op.layout.shapes
    with torch.enable_grad():
        outputs = op.batch_outputs(batch)
        curvature = curvature_of(outputs, batch, index)
        dummy = torch.zeros_like(outputs, requires_grad=True)
        vjp = torch.autograd.grad(outputs, leaves, grad_outputs=dummy, create_graph=True,
                                  allow_unused=True)
        live = [i for i, t in enumerate(vjp) if t is not None and t.requires_grad]
        if not live:  # the outputs do not depend on the measured parameters
            return out
        for column in range(block.shape[1]):
            tangent = [block[slices[i], column].view(shapes[i]) for i in live]
            (jv,) = torch.autograd.grad([vjp[i] for i in live], dummy, grad_outputs=tangent,
                                        retain_graph=True)
            w = curvature(jv)
            jtw = torch.autograd.grad(outputs, leaves, grad_outputs=w, retain_graph=True,
                                      allow_unused=True)
            out[:, column] = op.layout.flatten(jtw, like=out)
    return out
