"""A curvature operator seen through a diagonal preconditioner: ``P^{-1/2} A P^{-1/2}``.

An optimizer whose step is ``θ ← θ − η P⁻¹ u`` (``u`` the gradient or its moving average) is
gradient descent in the coordinates ``φ = P^{1/2} θ``, where the Hessian is

.. math::  \\tilde H = P^{-1/2} H P^{-1/2}, \\qquad \\lambda(\\tilde H) = \\lambda(P^{-1} H).

Its top eigenvalue is the *preconditioned sharpness* that Cohen et al. (2022, "Adaptive gradient
methods at the edge of stability") find hovering at ``(2 + 2β₁)/((1 − β₁) η) = 38/η`` for Adam
with ``β₁ = 0.9``; its top subspace is where such an optimizer's steps ``P^{1/2} Δθ`` concentrate.

:func:`preconditioner_diagonal` reads ``P`` from the optimizer's state, exactly as its next step
divides by it (the state after the last step; the next gradient's contribution is not yet known):

=================  ============================================================================
``SGD``            ``P = 1``
``Adam``/``AdamW`` ``P = sqrt(v / (1 − β₂ᵗ)) + ε`` (``v`` = ``exp_avg_sq``, or ``max_exp_avg_sq``
                   with ``amsgrad``; ``t`` the optimizer's step count), as ``torch.optim.Adam``;
                   ``first_moment_correction=True`` also multiplies by ``1 − β₁ᵗ`` (Cohen et al.'s
                   ``P_t``: the step is ``η m / P`` with ``m`` uncorrected)
``RMSprop``        ``P = sqrt(s) + ε`` (``s`` = ``square_avg``; centred: ``sqrt(s − ḡ²) + ε``)
``Adagrad``        ``P = sqrt(Σ g²) + ε``
=================  ============================================================================
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tinysubspace.operator import SymmetricOperator

__all__ = ["PreconditionedOperator", "preconditioner_diagonal"]

SUPPORTED = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")


class PreconditionedOperator(SymmetricOperator):
    """``P^{-1/2} A P^{-1/2}`` for a symmetric operator ``A`` and a positive diagonal ``P``.

    Args:
        op: the operator ``A`` (for an optimizer, one with a parameter ``layout`` and a
            ``model``: :class:`~tinysubspace.curvature.hessian.HessianOperator`, a GGN or a
            Fisher operator).
        preconditioner: a ``torch.optim`` optimizer over (at least) the parameters ``op``
            measures (``P`` read by :func:`preconditioner_diagonal`), or the diagonal ``P``
            itself as a ``(p,)`` tensor.
        first_moment_correction: see :func:`preconditioner_diagonal`.

    Attributes:
        diagonal: ``P`` as a ``(p,)`` tensor in ``op``'s dtype and device.

    Raises:
        ValueError: ``P`` of the wrong shape, not finite or not positive.
        (And everything :func:`preconditioner_diagonal` raises.)
    """

    def __init__(self, op: SymmetricOperator, preconditioner: torch.optim.Optimizer | torch.Tensor,
                 first_moment_correction: bool = False) -> None:
        if isinstance(preconditioner, torch.Tensor):
            diagonal = preconditioner.detach()
        else:
            diagonal = preconditioner_diagonal(preconditioner, op, first_moment_correction)
        p = op.shape[0]
        if diagonal.shape != (p,):
            raise ValueError(f"the preconditioner diagonal must have shape ({p},) like the "
                             f"operator, got {tuple(diagonal.shape)}")
        if not bool(torch.isfinite(diagonal).all()) or not bool((diagonal > 0).all()):
            raise ValueError("the preconditioner diagonal must be finite and positive; "
                             f"its smallest entry is {float(diagonal.min()):.3e}")
        super().__init__(p, op.dtype, op.device)
        self.op = op
        self.diagonal = diagonal.to(device=op.device, dtype=op.dtype)
        self._inverse_sqrt = self.diagonal.rsqrt()

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        scale = self._inverse_sqrt[:, None]
        return scale * (self.op @ (scale * block))

    def to_preconditioned(self, delta: torch.Tensor) -> torch.Tensor:
        """A parameter displacement ``Δθ`` in the coordinates of this operator: ``P^{1/2} Δθ``
        (so that the share of an optimizer step in the top subspace ``V`` of ``P^{-1/2} A
        P^{-1/2}`` is ``top_fraction(op.to_preconditioned(Δθ), V)``)."""
        return self.diagonal.sqrt() * delta.to(device=self.device, dtype=self.dtype)


def preconditioner_diagonal(optimizer: torch.optim.Optimizer, op: Any,
                            first_moment_correction: bool = False) -> torch.Tensor:
    """The diagonal ``P`` the optimizer divides its next step by, on ``op``'s flat layout.

    Args:
        optimizer: ``SGD``, ``Adam``, ``AdamW``, ``RMSprop`` or ``Adagrad`` (module docstring).
        op: an operator with ``layout`` (names in ``model.named_parameters()`` order) and
            ``model``; each measured parameter must be one the optimizer updates.
        first_moment_correction: Adam only: multiply by ``1 − β₁ᵗ`` (the step ``η m̂ / P``
            written as ``η m / P``; Cohen et al. 2022's ``P_t``).

    Returns:
        ``(p,)`` tensor in ``op``'s dtype and device.

    Raises:
        TypeError: an unsupported optimizer, or an ``op`` without ``layout`` and ``model``.
        ValueError: a measured parameter the optimizer does not update, or an adaptive
            optimizer that has not taken a step yet (no second moments).
    """
    kind = type(optimizer).__name__
    if not isinstance(optimizer, torch.optim.Optimizer) or kind not in SUPPORTED:
        raise TypeError(f"preconditioner_diagonal supports {', '.join(SUPPORTED)}, got {kind}")
    if not (hasattr(op, "layout") and hasattr(op, "model")):
        raise TypeError(f"the operator ({type(op).__name__}) has no parameter layout and model to "
                        "map the optimizer's parameters onto; pass the diagonal P as a tensor")
    named = dict(op.model.named_parameters())
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    parts = []
    for name in op.layout.names:
        param = named[name]
        if id(param) not in groups:
            raise ValueError(f"parameter {name!r} is measured by the operator but not updated by "
                             f"the {kind} optimizer; build the operator with params= the "
                             "optimizer's parameters")
        diag = _diagonal(kind, param, groups[id(param)], optimizer.state.get(param, {}), name,
                         first_moment_correction)
        parts.append(diag.detach().reshape(-1).to(device=op.device, dtype=op.dtype))
    return torch.cat(parts)


def _diagonal(kind: str, param: torch.Tensor, group: dict, state: dict, name: str,
              first_moment_correction: bool) -> torch.Tensor:
    if kind == "SGD":
        return torch.ones_like(param)
    if not state:
        raise ValueError(f"the {kind} optimizer has no state for parameter {name!r}: take a step "
                         "first (its second moments define P)")
    eps = float(group["eps"])
    if kind in ("Adam", "AdamW"):
        t = float(state["step"])
        beta1, beta2 = (float(b) for b in group["betas"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        diag = v.sqrt() / math.sqrt(1 - beta2**t) + eps
        return diag * (1 - beta1**t) if first_moment_correction else diag
    if kind == "RMSprop":
        square = state["square_avg"]
        if group.get("centered"):
            square = square - state["grad_avg"].square()
        return square.sqrt() + eps
    return state["sum"].sqrt() + eps  # Adagrad
