"""The edge of stability: an optimizer's sharpness threshold, and a cheap warm-started sharpness.

On a quadratic with curvature ``λ`` along an eigenvector, each optimizer's step is a linear
recurrence that diverges once ``η λ`` passes a threshold fixed by its settings (roots of the
characteristic polynomial leave the unit disc at ``z = −1``):

=========================================  ===================================================
gradient descent / SGD                     ``λ < 2/η``
heavy ball (``torch.optim.SGD(momentum=β,   ``λ < (2 + 2β) / ((1 − d) η)``
dampening=d)``)
Nesterov (``nesterov=True``)               ``λ < (2 + 2β) / ((1 + 2β) η)``
Adam/AdamW, ``λ`` of ``P⁻¹H`` (frozen P)   ``λ < (2 + 2β₁) / ((1 − β₁) η)`` = ``38/η`` at β₁ = 0.9
RMSprop, ``λ`` of ``P⁻¹H``, momentum ``μ``  ``λ < (2 + 2μ) / η``
Adagrad, ``λ`` of ``P⁻¹H``                  ``λ < 2 / η_t`` (``η_t`` after ``lr_decay``)
=========================================  ===================================================

Cohen et al. (2021, "Gradient descent on neural networks typically occurs at the edge of
stability") find that full-batch gradient descent first raises the sharpness ``λ_max(H)``
(progressive sharpening) until it reaches ``2/η`` and then hovers just above it; Cohen et al.
(2022) find the same for the preconditioned sharpness ``λ_max(P⁻¹H)`` of adaptive methods at
their thresholds (``P`` from :func:`tinysubspace.curvature.preconditioned.preconditioner_diagonal`
with ``first_moment_correction=True``, their ``P_t``).

SGD's L2 ``weight_decay`` adds ``wd`` to every eigenvalue of the loss's Hessian; the threshold
returned is for the loss without it (``threshold − wd``). For Adam, AdamW and RMSprop weight
decay is left out (it is not a shift of ``P⁻¹H``).
"""

from __future__ import annotations

from typing import Any

import torch

from tinysubspace.linalg.lanczos import Eigenpairs
from tinysubspace.linalg.warm_start import track_eigenpairs

__all__ = ["sharpness", "sharpness_threshold", "stability_row"]


def sharpness_threshold(optimizer: torch.optim.Optimizer) -> float:
    """The largest (preconditioned) sharpness at which ``optimizer`` is stable on a quadratic.

    >>> w = [torch.zeros(1, requires_grad=True)]
    >>> sharpness_threshold(torch.optim.SGD(w, lr=0.01))
    200.0
    >>> round(sharpness_threshold(torch.optim.Adam(w, lr=1e-3)), 6)  # 38 / η
    38000.0

    Raises:
        TypeError: an optimizer other than SGD, Adam, AdamW, RMSprop, Adagrad.
        ValueError: parameter groups with different settings (no single threshold).
    """
    kind = type(optimizer).__name__
    rules = {"SGD": _sgd, "Adam": _adam, "AdamW": _adam, "RMSprop": _rmsprop,
             "Adagrad": _adagrad}
    if kind not in rules:
        raise TypeError(f"sharpness_threshold supports {', '.join(rules)}, got {kind}")
    values = {rules[kind](group, optimizer.state, kind) for group in optimizer.param_groups}
    if len(values) != 1:
        raise ValueError(f"the {kind} optimizer's parameter groups have different thresholds "
                         f"{sorted(values)} (different learning rates or momenta); measure each "
                         "group's parameters on their own")
    return values.pop()


def _lr(group: dict[str, Any]) -> float:
    lr = float(group["lr"])
    if not lr > 0:
        raise ValueError(f"the learning rate must be positive for a stability threshold, got {lr}")
    return lr


def _sgd(group: dict[str, Any], state: Any, kind: str) -> float:
    lr, beta = _lr(group), float(group.get("momentum", 0.0))
    if beta == 0:
        threshold = 2 / lr
    elif group.get("nesterov"):
        threshold = (2 + 2 * beta) / ((1 + 2 * beta) * lr)
    else:
        threshold = (2 + 2 * beta) / ((1 - float(group.get("dampening", 0.0))) * lr)
    return threshold - float(group.get("weight_decay", 0.0))


def _adam(group: dict[str, Any], state: Any, kind: str) -> float:
    beta1 = float(group["betas"][0])
    return (2 + 2 * beta1) / ((1 - beta1) * _lr(group))


def _rmsprop(group: dict[str, Any], state: Any, kind: str) -> float:
    return (2 + 2 * float(group.get("momentum", 0.0))) / _lr(group)


def _adagrad(group: dict[str, Any], state: Any, kind: str) -> float:
    steps = [float(state[p]["step"]) for p in group["params"] if p in state]
    step = max(steps) if steps else 0.0
    return 2 * (1 + step * float(group.get("lr_decay", 0.0))) / _lr(group)


def sharpness(op, previous: Eigenpairs | torch.Tensor | None = None, k: int = 1,
              tol: float = 1e-3, seed: int = 0, max_matvecs: int | None = None,
              warm: str = "subspace") -> Eigenpairs:
    """``λ_max`` (and the next ``k − 1``) of ``op``, warm-started from the previous measurement.

    The cheap every-few-steps sharpness of an edge-of-stability run: ``k = 1`` or ``2`` pairs by
    :func:`tinysubspace.linalg.warm_start.track_eigenpairs`, to a loose residual ``tol`` (the
    eigenvalue's error is about ``tol² |λ_1|² / gap``, far below ``tol · λ_1``).

    Args:
        op: a symmetric operator (a Hessian, or a :class:`PreconditionedOperator`).
        previous: the last measurement's :class:`Eigenpairs` or vectors (``None``: cold start).
        k: pairs wanted. tol: relative residual. seed: random start.
        max_matvecs: a cap on the products of this solve.
        warm: how ``previous`` is used (:data:`tinysubspace.WARM_STARTS`). Default
            ``"subspace"``: Rayleigh–Ritz on the previous vectors first. The ``"krylov"`` start
            (previous + 1% random) stopped after 2 products on Adam's preconditioned Hessian
            at step 10 of ``eos-adam-fc-digits`` with ``λ = 0.0036`` "converged" (residual 12.8
            below ``tol · max|θ|``, ``max|θ|`` a large negative Ritz value) where
            ``λ_max = 1.3·10⁵``; ``"subspace"`` found ``1.3·10⁵`` in 11 products.

    Returns:
        :class:`Eigenpairs`; ``values[0]`` is the sharpness.
    """
    return track_eigenpairs(op, k, previous, tol=tol, seed=seed, max_matvecs=max_matvecs,
                            warm=warm)


def stability_row(eig: Eigenpairs, threshold: float, prefix: str = "sharpness") -> dict[str, float]:
    """Flat columns ``{prefix}/lambda_i``, ``{prefix}/threshold``, ``{prefix}/ratio`` (λ₁ over
    the threshold: 1 at the edge of stability) and ``{prefix}/residual`` (relative)."""
    values = [float(v) for v in eig.values]
    row = {f"{prefix}/lambda_{i + 1}": v for i, v in enumerate(values)}
    row[f"{prefix}/threshold"] = float(threshold)
    row[f"{prefix}/ratio"] = values[0] / float(threshold)
    row[f"{prefix}/residual"] = float(eig.residuals.max()) / max(abs(values[0]), 1e-300)
    return row
