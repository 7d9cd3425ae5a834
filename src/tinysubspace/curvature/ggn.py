"""The generalised Gauss–Newton matrix of a mean loss over a whole data set, as an operator.

For a network with outputs :math:`z_i = f(x_i; \\theta)` (flattened, :math:`C` numbers each) and
a loss :math:`\\ell(z, y)`, the Hessian splits as (Sagun et al. 2017; Papyan 2019, eq. 2)

.. math::  \\nabla^2 L = \\underbrace{\\frac1N \\sum_i J_i^T\\, \\nabla^2_{z}\\ell_i\\, J_i}_{G}
           \\;+\\; \\underbrace{\\frac1N \\sum_i \\sum_c \\frac{\\partial \\ell_i}{\\partial z_{ic}}
           \\nabla^2_\\theta z_{ic}}_{H - G},
           \\qquad J_i = \\partial z_i / \\partial \\theta \\;(C \\times p).

:class:`GGNOperator` applies :math:`G` exactly, never forming :math:`J`: per batch ``B_j`` the
outputs are computed once with their graph, and for each column ``v`` of a block

1. ``J v`` by the double-backward trick: ``u ↦ Jᵀu`` is linear in a dummy ``u``, and
   :math:`J v = \\partial (J^T u \\cdot v) / \\partial u`;
2. ``w = (∇²_z ℓ_j) J v`` by double backprop of the batch loss in the outputs only (a
   ``C n_j``-dimensional problem; for cross-entropy this is ``(diag p_i − p_i p_iᵀ)/n_j``, for
   mean-squared error ``2 I / (n_j C)``);
3. ``Jᵀ w`` by one backward pass through the retained output graph.

Batches are weighted by their sizes, :math:`G = \\frac1N \\sum_j n_j G_j`, exactly as the Hessian
(:mod:`tinysubspace.curvature.hessian`), and the sums meet in the same place
(``_sum_over_data``), so the operator is distributed in the same way. ``G`` is positive
semi-definite whenever the loss is convex in the outputs (cross-entropy, MSE).
:class:`GaussNewtonResidual` applies ``H − G`` in one data pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.func import functional_call

from tinysubspace.curvature.data import Batch, call_model, checked_loss
from tinysubspace.curvature.hessian import HessianOperator, module_mode

__all__ = ["GGNOperator", "GaussNewtonResidual", "OutputCurvature"]

OutputCurvature = Callable[[torch.Tensor], torch.Tensor]
"""``w ↦ M w`` on the outputs of one batch (shape ``(n_j, C)`` in and out), where ``M`` is the
output-space curvature of the batch's *mean* loss (for the GGN, ``∇²_z ℓ_j``)."""


class GGNOperator(HessianOperator):
    """Exact generalised Gauss–Newton matrix ``G = (1/N) Σ_i J_iᵀ ∇²_z ℓ_i J_i`` of a data set.

    Same contract as :class:`~tinysubspace.curvature.hessian.HessianOperator` (a snapshot of the
    parameters; mean over the whole data set, weighted by batch size; a block of ``b`` columns
    in one data pass; ``dtype=torch.float64`` on demand; distributed the same way) and the same
    arguments. The model must return a tensor with a leading batch dimension.

    ``mode="train"`` with batch norm gives the GGN of the batch-statistics network: each
    ``J`` is then the Jacobian of a whole batch's outputs, and ``G`` depends on the batching.

    Raises:
        TypeError: the model does not return a tensor (when a product is taken).
        (And everything :class:`~tinysubspace.curvature.hessian.HessianOperator` raises.)
    """

    product_name = "GGN-vector product"

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                 data: Any, params: Iterable[str | torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 mode: str = "eval", batch_size: int | None = None,
                 distributed: bool | None = None, hvp_method: str = "auto") -> None:
        super().__init__(model, loss_fn, data, params=params, dtype=dtype, device=device,
                         mode=mode, batch_size=batch_size, distributed=distributed,
                         hvp_method=hvp_method)

    # ---------------------------------------------------------------- internals
    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        def local_sum() -> torch.Tensor:  # Σ n_j (batch product) over this process's data
            total = torch.zeros_like(block)
            for index, batch in enumerate(self.batches):
                total += batch.size * self._batch_product(batch, index, block)
            return total

        result = self._sum_over_data(local_sum, block=block) / self.num_examples
        self._check_finite(result, self.product_name, None)
        return result

    def _batch_product(self, batch: Batch, index: int, block: torch.Tensor) -> torch.Tensor:
        """This batch's ``(1/n_j) Σ_i J_iᵀ M_i J_i V``; subclasses change ``M`` or add terms."""
        return self._linearized_product(batch, index, block, self._output_curvature)

    def _output_curvature(self, outputs: torch.Tensor, batch: Batch,
                          index: int) -> OutputCurvature:
        """``w ↦ ∇²_z ℓ_j w``: double backprop of the batch loss in its outputs."""
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self._checked_loss(z, batch, index)
            (dz,) = torch.autograd.grad(loss, z, create_graph=True)
        if not dz.requires_grad:  # the loss is at most linear in the outputs
            return torch.zeros_like

        def apply(w: torch.Tensor) -> torch.Tensor:
            (hw,) = torch.autograd.grad(dz, z, grad_outputs=w, retain_graph=True,
                                        allow_unused=True)
            return torch.zeros_like(w) if hw is None else hw

        return apply

    def _linearized_product(self, batch: Batch, index: int, block: torch.Tensor,
                            curvature_of: Callable[..., OutputCurvature]) -> torch.Tensor:
        """``Jᵀ M J V`` for one batch, ``M = curvature_of(outputs, batch, index)``."""
        out = torch.zeros_like(block)
        leaves, slices, shapes = self._leaves, self.layout.slices(), self.layout.shapes
        with torch.enable_grad():
            outputs = self._batch_outputs(batch)
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
                out[:, column] = self.layout.flatten(jtw, like=out)
        return out

    def _batch_outputs(self, batch: Batch) -> torch.Tensor:
        """The model's outputs on ``batch`` at the measured parameters, with their graph."""
        state = {**self._fixed, **self._buffers,
                 **dict(zip(self.layout.names, self._leaves, strict=True))}
        if self.mode == "train":  # running statistics update our copies, never the model's
            state.update({name: b.clone() for name, b in self._buffers.items()})
        with module_mode(self.model, train=self.mode == "train"):
            outputs = call_model(_Bound(self.model, state), batch.inputs)
        if not isinstance(outputs, torch.Tensor) or outputs.ndim == 0:
            kind = type(outputs).__name__ if not isinstance(outputs, torch.Tensor) else "a scalar"
            raise TypeError(f"{type(self).__name__} needs a model that returns a tensor with a "
                            f"batch dimension, got {kind}")
        return outputs

    def _checked_loss(self, outputs: torch.Tensor, batch: Batch, index: int,
                      targets: Any = None) -> torch.Tensor:
        """``loss_fn(outputs, targets)`` (default: the batch's), checked scalar and finite."""
        return checked_loss(self.loss_fn(outputs, batch.targets if targets is None else targets),
                            index)


class GaussNewtonResidual(GGNOperator):
    """``H − G = (1/N) Σ_i Σ_c (∂ℓ_i/∂z_ic) ∇²_θ z_ic``, the part of the Hessian the GGN leaves
    out, in one data pass (per batch the Hessian product of :class:`HessianOperator` minus the
    GGN product). Zero for a model linear in its parameters; small where the residuals
    ``∂ℓ/∂z`` are small (a well-fitted training set). Arguments as :class:`GGNOperator`.

    The same operator by operator arithmetic (two data passes):
    ``HessianOperator(...) - GGNOperator(...)``.
    """

    product_name = "Gauss–Newton residual product"

    def _batch_product(self, batch: Batch, index: int, block: torch.Tensor) -> torch.Tensor:
        return self._batch_hvp(batch, index, block) - super()._batch_product(batch, index, block)


class _Bound:
    """``model`` called with the given parameters and buffers (``functional_call``)."""

    def __init__(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.model, self.state = model, state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.state, args, kwargs)
