"""Finite-difference Hessian-vector products: differences of ordinary gradients, no double backward.

:class:`FiniteDifference` is the ``finite_difference`` / ``finite_difference4`` strategy of
:mod:`tinysubspace.curvature.hvp` (called as ``strategy(op, batch, index, block)``); its products
are :class:`ProductEstimate` objects that carry a per-column error estimate, which the data-set
operators weight and sum like the products (``op.last_product_error``, ``op.product_error``).
Half-precision models are measured in their own dtype: the point and the sums in float32
(:func:`accumulation_dtype`), the step and floor measured (:data:`HALF_PRECISION_STEP`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "HALF_PRECISION_FLOOR",
    "HALF_PRECISION_STEP",
    "FiniteDifference",
    "ProductEstimate",
    "accumulation_dtype",
]

HALF_PRECISION_STEP = {torch.bfloat16: 1e-3, torch.float16: 5e-4}
"""``κ`` of the finite-difference step ``h = κ max(‖θ‖, 1) / ‖v‖`` for a model measured in its
own half precision (:class:`FiniteDifference`, "Half precision"; measured, docs/scale.md)."""

HALF_PRECISION_FLOOR = {torch.bfloat16: 0.1, torch.float16: 0.1}
"""A-priori relative error of a half-precision finite-difference product (measured)."""


@dataclass(frozen=True)
class ProductEstimate:
    """An approximate batch product and a bound on its error, per column.

    Attributes:
        value: the ``(p, b)`` product.
        error: ``(b,)`` estimated absolute error of each column (2-norm).
    """

    value: torch.Tensor
    error: torch.Tensor



class FiniteDifference:
    """``∇²ℓ_j v`` from differences of ordinary gradients along ``v``: no double backward.

    With :math:`g(t) = \\nabla \\ell_j(\\theta + t v)`, the central difference and its
    Richardson extrapolation (``points=4``, ``hvp_method="finite_difference4"``) are

    .. math::  D_2(h) = \\frac{g(h) - g(-h)}{2h} = \\nabla^2 \\ell_j v
               + \\frac{h^2}{6} \\nabla^4 \\ell_j[v, v, v] + O(h^4),
               \\qquad D_4(h) = \\frac{4 D_2(h) - D_2(2h)}{3} = \\nabla^2 \\ell_j v + O(h^4).

    **Step.** Each gradient carries a rounding error of about :math:`\\epsilon \\lVert g
    \\rVert` (:math:`\\epsilon` the dtype's machine epsilon), so the error of :math:`D_2` is
    about :math:`\\tfrac{h^2}{6} \\lVert \\nabla^4 \\ell[v,v,v] \\rVert
    + \\epsilon \\lVert g \\rVert / h`. If the loss varies on the scale of ``θ``
    (:math:`\\lVert \\nabla^4 \\ell[v,v,v] \\rVert \\sim \\lVert g \\rVert
    \\lVert v \\rVert^3 / s^3`, :math:`s = \\max(\\lVert\\theta\\rVert, 1)`) the two
    terms balance at

    .. math::  h = \\epsilon^{1/3}\\, \\max(\\lVert\\theta\\rVert, 1) / \\lVert v\\rVert

    (the classic per-coordinate rule :math:`h_i = \\epsilon^{1/3} |\\theta_i|` for the whole
    vector), each column its own ``h``, where both are of relative order
    :math:`\\epsilon^{2/3}` (4e-11 in float64, 2e-5 in float32): :meth:`error_floor`.
    :math:`D_4` uses the same ``h``: its truncation :math:`O(h^4)` is then negligible and it is
    limited by rounding (the step :math:`\\epsilon^{1/5} s` that would balance a smooth loss is
    100× longer and crosses the kinks of a ReLU network: measured relative error 0.9 on the
    test CNN, against 3e-11 at ``h``).

    **Half precision** (``bfloat16``, ``float16``: a model measured in its own dtype, no float32
    copy). Three errors meet, measured on the project's ``gpt`` (docs/scale.md, "Low
    precision"): the gradient's own rounding through the whole forward and backward (5e-3 of
    ``‖g‖`` in bf16), the rounding of the point ``θ ± h v`` to bf16 (a shift below half an ulp
    of ``θ_i``, ``2^{-9} |θ_i|``, is lost), and the truncation, which along a top eigenvector of a
    transformer is 100× that of the "scale of ``θ``" model (the loss bends on a scale of
    ``‖θ‖/200``: embeddings and biases that feed the residual stream). ``eps^{1/3} = 0.2``
    gave a relative product error of 0.98 there; the error against ``κ = h ‖v‖ / max(‖θ‖, 1)`` was
    smallest at ``κ = 1e-3`` (0.07 along the top eigenvector, 0.3 along a random vector, untrained
    ``gpt``), so :data:`HALF_PRECISION_STEP` is ``1e-3`` for bf16 (``float16``: ``5e-4``, the
    same balance scaled by ``eps^{1/3}``, not measured) and :data:`HALF_PRECISION_FLOOR` 0.1.
    The point is formed in float32 and rounded once (never a float32 copy of the model: one
    parameter at a time), the two gradients are differenced and divided in float32, and the
    data-set operator sums the batches in float32 (:func:`accumulation_dtype`). After 300 Adam
    steps (λ1 = 128) the same ``gpt``'s bf16 products were wrong by 0.5: measure trained models
    with ``dtype=torch.float32`` (a copy). ReLU networks with many units: a difference crosses
    kinks and its error does not shrink with ``h`` (a factor 127 for 512 examples × 200 units).

    **Error estimate** (absolute, per column, carried by the :class:`ProductEstimate`):
    :math:`D_2`: the rounding term :math:`\\epsilon (\\lVert g(h)\\rVert +
    \\lVert g(-h)\\rVert) / 2h` doubled (the model's balance; the real truncation constant
    needs two more gradients and was up to 50× larger on the test networks);
    :math:`D_4`: :math:`\\lVert D_4 - D_2(h)\\rVert` (the measured error of the 2-point form,
    a bound on the 4-point one) plus its rounding term.

    Costs 2 (``points=2``) or 4 forward and backward passes per column and batch, and the memory
    of one ordinary gradient: it runs through kernels that are differentiable only once
    (``@once_differentiable``, fused or sharded layers) where double backward cannot. Train-mode
    dropout draws new masks for each gradient and ruins the difference
    (:meth:`~tinysubspace.curvature.dataset_operator.DataSetOperator.check_deterministic`
    catches it).
    """

    uses_graph = False

    def __init__(self, points: int = 2) -> None:
        if points not in (2, 4):
            raise ValueError(f"finite differences use 2 or 4 points, got {points}")
        self.points = points

    def error_floor(self, dtype: torch.dtype) -> float:
        """A-priori relative error of one product: ``eps^(2/3)`` (class docstring); for
        ``float16`` / ``bfloat16`` the measured :data:`HALF_PRECISION_FLOOR`."""
        if dtype in HALF_PRECISION_STEP:
            return HALF_PRECISION_FLOOR[dtype]
        return torch.finfo(dtype).eps ** (2 / 3)

    def step(self, theta_norm: float, v_norm: float, dtype: torch.dtype) -> float:
        """``h = κ max(‖θ‖, 1) / ‖v‖`` with ``κ = eps^(1/3)`` (class docstring), or the
        measured :data:`HALF_PRECISION_STEP` ``κ`` for ``float16`` / ``bfloat16``."""
        kappa = HALF_PRECISION_STEP.get(dtype, torch.finfo(dtype).eps ** (1 / 3))
        return kappa * max(theta_norm, 1.0) / v_norm

    def __call__(self, op: Any, batch: Any, index: int, block: torch.Tensor) -> ProductEstimate:
        work = accumulation_dtype(block.dtype)  # float32 for a half-precision model
        out = torch.zeros(block.shape, dtype=work, device=block.device)
        error = out.new_zeros(block.shape[1])
        eps = torch.finfo(block.dtype).eps
        theta_norm = float(torch.cat([leaf.detach().reshape(-1).to(work)
                                      for leaf in op.leaves]).norm())
        for column in range(block.shape[1]):
            v = block[:, column].to(work)
            v_norm = float(v.norm())
            if v_norm == 0.0:
                continue
            h = self.step(theta_norm, v_norm, block.dtype)
            g1, m1 = _gradient_at(op, batch, index, v, h), _gradient_at(op, batch, index, v, -h)
            d2 = (g1 - m1) / (2 * h)
            rounding = eps * (g1.norm() + m1.norm()) / (2 * h)
            if self.points == 2:
                out[:, column], error[column] = d2, 2 * rounding
                continue
            g2, m2 = (_gradient_at(op, batch, index, v, 2 * h),
                      _gradient_at(op, batch, index, v, -2 * h))
            d4 = (8 * (g1 - m1) - (g2 - m2)) / (12 * h)
            rounding4 = eps * (8 * (g1.norm() + m1.norm()) + g2.norm() + m2.norm()) / (12 * h)
            out[:, column], error[column] = d4, (d4 - d2).norm() + rounding4
        return ProductEstimate(out, error)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and differences of a ``dtype`` measurement are formed in: ``float32``
    for ``float16`` / ``bfloat16`` (a model measured in its own half precision), else ``dtype``.

    >>> accumulation_dtype(torch.bfloat16), accumulation_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _gradient_at(op: Any, batch: Any, index: int, v: torch.Tensor, t: float) -> torch.Tensor:
    """``∇ℓ_j(θ + t v)``, flat in ``v``'s dtype, by one ordinary forward and backward pass.

    The point is formed in ``v``'s dtype and rounded once to the model's (``θ + t v`` in
    float32, then bfloat16 for a bf16 model): one parameter at a time, so the float32 shadow
    costs the largest parameter's size in float32, never a copy of the model."""
    pieces = op.layout.split(v)
    leaves = [(leaf.detach().to(v.dtype) + t * piece).to(leaf.dtype).requires_grad_(True)
              for leaf, piece in zip(op.leaves, pieces.values(), strict=True)]
    with torch.enable_grad():
        loss = op.batch_loss(batch, index, leaves=leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return op.layout.flatten([None if g is None else g.to(v.dtype) for g in grads], like=v)
