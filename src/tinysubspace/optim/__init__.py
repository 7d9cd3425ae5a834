"""Training inside (and outside) the tiny subspace: projected SGD and low-rank Newton (eq. 11).

Every optimizer here is "take a gradient ``g``, transform it, step" (STYLE.md point 7)::

    Dom-SGD   (top-subspace SGD, PAPER.txt section 4):   θ ← θ − η P_top g,      P_top = V Vᵀ
    Bulk-SGD  (Song, Ahn & Yun 2024, "Does SGD really
               happen in tiny subspaces?"):               θ ← θ − η (I − P_top) g
    low-rank Newton (eq. 11):                            θ ← θ − η V (Λ + δ)⁻¹ Vᵀ g

``V`` (``p × k``) and ``Λ`` are the top-k eigenpairs of the Hessian of the loss over the full
training set (or a fixed subset), recomputed every ``m`` steps by an eigensolver warm-started from
the previous ``V`` (:class:`HessianSubspace`). ``g`` is the mini-batch gradient the training loop
left in ``p.grad``, or a full-batch gradient from a callable. ``η = 1, δ = 0`` is eq. 11 exactly.

The pieces compose: :class:`SubspaceSGD` = a gradient source + a :class:`HessianSubspace` + a
direction (:class:`TopProjection`, :class:`BulkProjection`, :class:`LowRankNewton`, or
:class:`SwitchOnTopFraction`, which is plain SGD until the moving average of ``f_top`` (eq. 2)
passes a threshold and another direction afterwards). The training loop builds them from its
config in
:mod:`tinysubspace.experiments.optimizers`.
"""

from tinysubspace.optim.directions import (
    BulkProjection,
    Direction,
    LowRankNewton,
    PlainGradient,
    Scaled,
    SwitchOnTopFraction,
    TopProjection,
)
from tinysubspace.optim.projections import lowrank_newton_direction, project_bulk, project_top
from tinysubspace.optim.subspace import HessianSubspace, SubspaceBasis
from tinysubspace.optim.subspace_sgd import SubspaceSGD

__all__ = [
    "BulkProjection",
    "Direction",
    "HessianSubspace",
    "LowRankNewton",
    "PlainGradient",
    "Scaled",
    "SubspaceBasis",
    "SubspaceSGD",
    "SwitchOnTopFraction",
    "TopProjection",
    "lowrank_newton_direction",
    "project_bulk",
    "project_top",
]
