"""Finite-difference Hessian-vector products: differences of ordinary gradients, no double backward.

:class:`FiniteDifference` is the ``finite_difference`` / ``finite_difference4`` strategy of
:mod:`tinysubspace.curvature.hvp` (called as ``strategy(op, batch, index, block)``); its products
are :class:`ProductEstimate` objects that carry a per-column error estimate, which the data-set
operators weight and sum like the products (``op.last_product_error``, ``op.product_error``).
Half-precision models are measured in their own dtype: the point and the sums in float32
(:func:`accumulation_dtype`), the step and floor measured (:data:`HALF_PRECISION_STEP`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tinysubspace.operator import working_dtype as accumulation_dtype  # the solvers' rule too

__all__ = [
    "HALF_PRECISION_FLOOR",
    "HALF_PRECISION_STEP",
    "PROBE_EVERY",
    "FiniteDifference",
    "ProductEstimate",
    "accumulation_dtype",
]

HALF_PRECISION_STEP = {torch.bfloat16: 1e-3, torch.float16: 5e-4}
"""``κ`` of the finite-difference step ``h = κ max(‖θ‖, 1) / ‖v‖`` for a model measured in its
own half precision (:class:`FiniteDifference`, "Half precision"; measured, docs/scale.md)."""

HALF_PRECISION_FLOOR = {torch.bfloat16: 0.1, torch.float16: 0.1}
"""A-priori relative error of a half-precision finite-difference product (measured)."""

PROBE_EVERY = 8
"""A 2-point product measures its truncation along every ``PROBE_EVERY``-th column (and the
first): 2 more gradients, so 1/8 more gradients in all (:class:`FiniteDifference`)."""

CALIBRATION_TRIALS = 6
"""Steps tried at the first product, ``ε^{1/3} 4^{-i}``, ``i < 6`` (down to ``ε^{1/3} / 1024``);
the trials stop early once the successive differences grow."""


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
    + \\epsilon \\lVert g \\rVert / h`. If the loss varied on the scale of ``θ`` the two
    terms would balance at the a-priori step

    .. math::  h_0 = \\epsilon^{1/3}\\, \\max(\\lVert\\theta\\rVert, 1) / \\lVert v\\rVert

    (the classic per-coordinate rule :math:`h_i = \\epsilon^{1/3} |\\theta_i|` for the whole
    vector), where both are of relative order :math:`\\epsilon^{2/3}` (4e-11 in float64, 2e-5 in
    float32): :meth:`error_floor`. Networks bend on a far shorter scale: along the top
    eigenvector of the project's ``gpt`` and of a trained LayerNorm–tanh MLP, ``h_0`` gave a
    relative error of 1e-6 in float64 and 0.5 in float32 (truncation), ``h_0 / 100`` gave 1e-10
    and 1e-4. So the step is **calibrated** at the operator's first product (:meth:`calibrate`,
    2 ``points`` gradients per trial): ``h = κ max(‖θ‖, 1) / ‖v‖`` with ``κ`` the first of
    :data:`CALIBRATION_TRIALS` trials ``ε^{1/3} 4^{-i}`` after the smallest gap between
    successive differences ``‖D(h_i) − D(h_{i+1})‖`` (the gaps fall 16× per trial while the
    2-point truncation dominates, 256× for the 4-point form, and grow 4× once rounding does: the
    Richardson-table rule of numerical differentiation). Then ``κ`` stays fixed: the operator
    is one linear map for the whole solve, and two products with the same vector agree.
    :math:`D_4` is calibrated the same way on its own differences.

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
    kinks and its error does not shrink with ``h`` (512 examples × 200 units: a factor 127 at
    ``h_0`` in float64, 6.7e-10 at the calibrated step, 1,000× shorter; 4.2 in float32).

    **Error estimate** (absolute, per column, carried by the :class:`ProductEstimate`):
    :math:`D_2`: the rounding term :math:`\\epsilon (\\lVert g(h)\\rVert +
    \\lVert g(-h)\\rVert) / 2h` doubled, and on every :attr:`probe_every`-th column (and the
    first) the truncation measured along that very column, :math:`\\lVert D_2(2h) - D_2(h)
    \\rVert / 3` (the :math:`h^2` terms of the two differ by a factor 4), for 2 more gradients
    (the a-priori model alone understated the error along top directions by 10⁵–10⁶: 1e-11
    against 1e-6 on the ``gpt``); the operator keeps the largest relative value seen
    (``op.product_error``), so a solve cannot claim a tolerance its products do not reach.
    :math:`D_4`: :math:`\\lVert D_4 - D_2(h)\\rVert` (the measured error of the 2-point form,
    an upper bound of the 4-point one's) plus its rounding term, on every column.

    Costs 2 (``points=2``) or 4 forward and backward passes per column and batch, and the memory
    of one ordinary gradient: it runs through kernels that are differentiable only once
    (``@once_differentiable``, fused or sharded layers) where double backward cannot. Train-mode
    dropout draws new masks for each gradient and ruins the difference
    (:meth:`~tinysubspace.curvature.dataset_operator.DataSetOperator.check_deterministic`
    catches it).
    """

    uses_graph = False

    def __init__(self, points: int = 2, probe_every: int | None = None) -> None:
        if points not in (2, 4):
            raise ValueError(f"finite differences use 2 or 4 points, got {points}")
        self.points = points
        self.probe_every = PROBE_EVERY if probe_every is None else int(probe_every)
        if self.probe_every < 1:
            raise ValueError(f"probe_every must be a positive number of columns, got "
                             f"{probe_every}")
        self.kappa: float | None = None
        """The step's scale ``κ`` once calibrated (``None`` before the first product)."""
        self.calibration_error = 0.0
        """The smallest gap of the calibration relative to the chosen difference: a measured
        floor of every column's relative error (class docstring, "Error estimate")."""

    def error_floor(self, dtype: torch.dtype) -> float:
        """A-priori relative error of one product: ``eps^(2/3)`` (class docstring); for
        ``float16`` / ``bfloat16`` the measured :data:`HALF_PRECISION_FLOOR`."""
        if dtype in HALF_PRECISION_STEP:
            return HALF_PRECISION_FLOOR[dtype]
        return torch.finfo(dtype).eps ** (2 / 3)

    @staticmethod
    def a_priori_kappa(dtype: torch.dtype) -> float:
        """``κ`` before calibration: ``eps^(1/3)``, or the measured :data:`HALF_PRECISION_STEP`."""
        return HALF_PRECISION_STEP.get(dtype, torch.finfo(dtype).eps ** (1 / 3))

    def step(self, theta_norm: float, v_norm: float, dtype: torch.dtype) -> float:
        """``h = κ max(‖θ‖, 1) / ‖v‖``: ``κ`` calibrated, else :meth:`a_priori_kappa`."""
        kappa = self.kappa if self.kappa is not None else self.a_priori_kappa(dtype)
        return kappa * max(theta_norm, 1.0) / v_norm

    def calibrate(self, gradient_at: Callable[[float], torch.Tensor], theta_norm: float,
                  v_norm: float, dtype: torch.dtype, norm: Callable[[torch.Tensor], float]
                  ) -> tuple[torch.Tensor, float] | None:
        """Fix :attr:`kappa` from trials along one column (class docstring, "Step"); return
        the trial at the step kept, ``(D(h), its rounding term)`` (``None`` for half precision,
        which tries nothing), so the column need not be differenced again.

        Args:
            gradient_at: ``t ↦ ∇ℓ(θ + t v)`` (flat).
            theta_norm, v_norm: ``‖θ‖`` and ``‖v‖``.
            dtype: the model's dtype (half precision keeps its measured step).
            norm: the 2-norm of a flat vector (over all ranks for sharded vectors).
        """
        base = self.a_priori_kappa(dtype)
        if dtype in HALF_PRECISION_STEP:  # rounding of the point itself dominates (docstring)
            self.kappa = base
            return None
        kappas = [base * 4.0 ** -i for i in range(CALIBRATION_TRIALS)]
        values, gaps = [], []
        for kappa in kappas:
            h = kappa * max(theta_norm, 1.0) / v_norm
            values.append(self._difference(gradient_at, h, dtype, norm))
            if len(values) > 1:
                gaps.append(norm(values[-1][0] - values[-2][0]))
                if len(gaps) >= 2 and gaps[-1] > gaps[-2]:
                    break  # rounding dominates from here on
        best = min(range(len(gaps)), key=gaps.__getitem__)
        self.kappa = kappas[best + 1]
        self.calibration_error = gaps[best] / max(norm(values[best + 1][0]),
                                                  torch.finfo(dtype).tiny)
        return values[best + 1]

    def column(self, gradient_at: Callable[[float], torch.Tensor], theta_norm: float,
               v_norm: float, dtype: torch.dtype, norm: Callable[[torch.Tensor], float],
               probe: bool) -> tuple[torch.Tensor, float]:
        """``(D v, its estimated absolute error)`` for one column (class docstring, "Error
        estimate"); the operator's first column calibrates the step; ``probe`` measures the
        truncation along ``v`` (2 or 4 more gradients).

        Args:
            gradient_at, theta_norm, v_norm, dtype, norm: as for :meth:`calibrate`.
            probe: whether to measure the truncation along this column.
        """
        kept = None if self.kappa is not None else self.calibrate(
            gradient_at, theta_norm, v_norm, dtype, norm)
        h = self.step(theta_norm, v_norm, dtype)
        value, rounding = kept or self._difference(gradient_at, h, dtype, norm)
        error = rounding + self.calibration_error * norm(value)
        if probe:  # D(2h) − D(h) = (4 − 1) h²/6 ∇⁴ℓ[v,v,v] (2 points), (16 − 1) × D_4's h⁴ term
            wide = self._difference(gradient_at, 2 * h, dtype, norm)[0]
            error += norm(wide - value) / (3 if self.points == 2 else 15)
        return value, error

    def probes(self, column: int) -> bool:
        """Whether the ``column``-th column an operator has applied (counting from 0, the
        same on every batch and rank of one product) measures its truncation."""
        return column % self.probe_every == 0

    def _difference(self, gradient_at: Callable[[float], torch.Tensor], h: float,
                    dtype: torch.dtype, norm: Callable[[torch.Tensor], float]
                    ) -> tuple[torch.Tensor, float]:
        """``(D(h), its rounding term)`` of this form: ``ε`` (the model's ``dtype``) times the
        gradients' norms, weighted as they enter ``D``, doubled for ``D_2`` (class docstring)."""
        eps = torch.finfo(dtype).eps
        plus, minus = gradient_at(h), gradient_at(-h)
        if self.points == 2:
            return (plus - minus) / (2 * h), eps * (norm(plus) + norm(minus)) / h
        plus2, minus2 = gradient_at(2 * h), gradient_at(-2 * h)
        value = (8 * (plus - minus) - (plus2 - minus2)) / (12 * h)
        weight = 8 * (norm(plus) + norm(minus)) + norm(plus2) + norm(minus2)
        return value, eps * weight / (12 * h)

    def __call__(self, op: Any, batch: Any, index: int, block: torch.Tensor) -> ProductEstimate:
        work = accumulation_dtype(block.dtype)  # float32 for a half-precision model
        out = torch.zeros(block.shape, dtype=work, device=block.device)
        error = out.new_zeros(block.shape[1])
        theta_norm = float(torch.cat([leaf.detach().reshape(-1).to(work)
                                      for leaf in op.leaves]).norm())
        first = int(getattr(op, "matvecs", 0))  # the same on every batch of one product
        for column in range(block.shape[1]):
            v = block[:, column].to(work)
            v_norm = float(v.norm())
            if v_norm == 0.0:
                continue
            out[:, column], error[column] = self.column(
                lambda t, v=v: _gradient_at(op, batch, index, v, t), theta_norm, v_norm,
                block.dtype, lambda x: float(x.norm()),
                probe=self.probes(first + column))
        return ProductEstimate(out, error)


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
