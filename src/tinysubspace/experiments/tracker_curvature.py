"""Curvature beyond the Hessian as tracker options (issue 15, docs/beyond-the-hessian.md).

:func:`curvature_groups` gives the column groups (:mod:`~tinysubspace.experiments.measurement`)
that add columns to each row of a
:class:`~tinysubspace.experiments.subspace_tracker.SubspaceTracker`, measured at the same step,
on the same data and in the same dtype as the Hessian's top ``2k`` eigenpairs ``V``:

``geometry=True``
    ``angles/previous_i`` (``i ≤ k``): all principal angles (radians) between the top-k subspace
    now and at the previous measurement (:func:`~tinysubspace.metrics.principal_angles`; eq. 5
    is their mean squared cosine) and ``displacement/hessian_i``, how far each top eigenvector
    moved since then (:func:`~tinysubspace.metrics.eigenvector_displacement`, ``√2`` =
    orthogonal).
``ggn=True``
    ``ggn/eig_i`` (``i ≤ 2k``): the top eigenvalues of the Gauss–Newton matrix ``G``
    (:class:`~tinysubspace.curvature.ggn.GGNOperator`, warm-started Lanczos), eq. 5 between
    the top-k subspaces of ``H`` and ``G`` (``overlap/hessian_ggn``) and their principal angles
    ``angles/hessian_ggn_i``.
``class_means=True``
    ``overlap/classmeans_hessian``: eq. 5 (unequal dimensions) between ``span{δ_{c,c}}``, the
    ``C`` class means of the per-example gradients (Papyan 2019; ``C`` backward passes per
    batch, :func:`~tinysubspace.curvature.class_means.class_gradient_means`), and the top-k
    Hessian subspace; with ``ggn`` also ``overlap/classmeans_ggn``; ``classmeans/rank``.
``optimizer=opt``
    ``sharpness/threshold`` (:func:`~tinysubspace.optim.stability.sharpness_threshold` of the
    optimizer's *current* settings: ``2/η`` for GD/SGD, ``38/η`` for Adam with ``β₁ = 0.9``),
    ``preconditioned/eig_i`` (``i ≤ k``), the top eigenvalues of ``P^{-1/2} H P^{-1/2}``
    (:class:`~tinysubspace.curvature.preconditioned.PreconditionedOperator`, ``P`` from the
    optimizer's state with the first-moment correction, Cohen et al. 2022's ``P_t``; ``P = 1``
    for SGD, whose values are then ``H``'s, reused without a solve), ``sharpness/ratio`` =
    ``preconditioned/eig_1 / sharpness/threshold`` (1 at the edge of stability), and
    ``preconditioned/update_share`` — eq. 2 applied to the update that led to this step:
    ``‖V_kᵀ P^{1/2} Δθ‖² / ‖P^{1/2} Δθ‖²`` with ``Δθ = θ_t − θ_{t−1}`` and ``V_k`` the
    preconditioned top-k (``P`` is the state after that update, the diagonal it divided by).
    An adaptive optimizer before its first step has no ``P``: those columns are empty.
    Where the optimizer has no threshold at a step (a learning rate of 0 during a warm-up
    or at the end of a decay) ``sharpness/threshold`` and ``sharpness/ratio`` are NaN.

``cost/curvature_matvecs`` and ``cost/curvature_seconds`` count what the options cost.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812

from tinysubspace.curvature.class_means import class_gradient_means, class_mean_basis
from tinysubspace.curvature.ggn import GGNOperator
from tinysubspace.curvature.layout import select_parameters
from tinysubspace.curvature.preconditioned import SUPPORTED, PreconditionedOperator
from tinysubspace.experiments.groups import CostGroup
from tinysubspace.experiments.measurement import Context
from tinysubspace.metrics import (
    eigenvector_displacement,
    principal_angles,
    subspace_overlap,
    top_fraction,
)
from tinysubspace.optim.stability import sharpness_threshold

__all__ = ["ClassMeansGroup", "GGNGroup", "GeometryGroup", "SharpnessGroup",
           "check_curvature_options", "curvature_groups", "curvature_settings"]

BUCKET = "curvature"  # cost/curvature_matvecs, cost/curvature_seconds


def check_curvature_options(model: torch.nn.Module, loss_fn: Any, outputs: Any, targets: Any,
                            *, ggn: bool, class_means: bool,
                            optimizer: torch.optim.Optimizer | None) -> int | None:
    """Refuse, before training starts, options the model, loss or optimizer cannot serve;
    returns the number of classes ``C`` (``None`` without ``class_means``).

    Raises:
        ValueError: ``ggn``/``class_means`` with outputs that are not a tensor, ``class_means``
            without ``(n, C)`` scores and integer labels or with a loss other than softmax
            cross-entropy, an optimizer without a threshold or preconditioner, or one that does
            not update every parameter the tracker measures.
    """
    if outputs is None:  # a rank without examples under torchrun: the others check
        return None
    if (ggn or class_means) and not isinstance(outputs, torch.Tensor):
        raise ValueError(f"ggn=True and class_means=True need a model that returns a tensor of "
                         f"outputs, got {type(outputs).__name__}")
    classes = _classes(loss_fn, outputs, targets) if class_means else None
    if optimizer is not None:
        _check_optimizer(model, optimizer)
    return classes


def _classes(loss_fn: Any, outputs: torch.Tensor, targets: Any) -> int:
    """``C`` of a softmax cross-entropy classifier (the class means assume that loss)."""
    if not (outputs.ndim == 2 and isinstance(targets, torch.Tensor) and targets.ndim == 1
            and not targets.is_floating_point()):
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets)
        raise ValueError(f"class_means=True needs (n, C) class scores and n integer labels, got "
                         f"outputs {tuple(outputs.shape)} and targets {shape}")
    with torch.no_grad():
        mine, ce = float(loss_fn(outputs, targets)), float(F.cross_entropy(outputs, targets))
    if not math.isclose(mine, ce, rel_tol=1e-6, abs_tol=1e-12):
        raise ValueError(f"class_means=True assumes softmax cross-entropy (Papyan's class means "
                         f"of logit gradients), but loss_fn gives {mine:.6g} where "
                         f"F.cross_entropy gives {ce:.6g} on the first batch")
    return int(outputs.shape[1])


def _check_optimizer(model: torch.nn.Module, optimizer: Any) -> None:
    kind = type(optimizer).__name__
    if not isinstance(optimizer, torch.optim.Optimizer) or kind not in SUPPORTED:
        raise ValueError(f"optimizer= supports torch.optim {', '.join(SUPPORTED)} (their "
                         f"stability thresholds and preconditioners are known), got {kind}")
    if all(float(group["lr"]) > 0 for group in optimizer.param_groups):  # warm-ups start at 0
        try:
            sharpness_threshold(optimizer)
        except (TypeError, ValueError) as error:
            raise ValueError(f"optimizer=: {error}") from error
    updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in select_parameters(model, None) if id(p) not in updated]
    if missing:
        raise ValueError(f"optimizer= does not update parameters the tracker measures: "
                         f"{missing[:5]}; pass the optimizer of all of them")


def curvature_groups(k: int, *, ggn: bool = False, class_means: bool = False,
                     geometry: bool = False, classes: int | None = None,
                     optimizer: torch.optim.Optimizer | None = None) -> list[Any]:
    """The groups of the options that are on, in the columns' order, and their cost group
    (``cost/curvature_*``) when any is; ``[]`` when none is."""
    groups: list[Any] = []
    if geometry:
        groups.append(GeometryGroup(k))
    if ggn:
        groups.append(GGNGroup(k))
    if class_means:
        groups.append(ClassMeansGroup(classes, ggn))
    if optimizer is not None:
        groups.append(SharpnessGroup(k, optimizer))
    return [*groups, CostGroup(BUCKET)] if groups else []


class _Group:
    """A curvature group: no state of its own (warm starts are in the context's
    :class:`~tinysubspace.linalg.warm_state.WarmStart`); seconds go to ``cost/curvature_*``."""

    name = ""
    deferred = False
    bucket = BUCKET

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class GeometryGroup(_Group):
    """``angles/previous_i`` (principal angles) and ``displacement/hessian_i`` between the
    Hessian's top-k now and at the previous measurement (empty at the first)."""

    name = "geometry"

    def __init__(self, k: int) -> None:
        self.k = k

    def names(self) -> list[str]:
        return ([f"angles/previous_{i}" for i in range(1, self.k + 1)]
                + [f"displacement/hessian_{i}" for i in range(1, self.k + 1)])

    def measure(self, ctx: Context) -> dict[str, float]:
        if ctx.previous is None:
            return {}
        top = ctx.eig.vectors[:, :self.k]
        return _geometry(ctx.previous[:, :self.k].to(top), top)


def _ggn_operator(ctx: Context) -> GGNOperator:
    """The GGN of the context's model and data, built once per measurement."""
    if "ggn_operator" not in ctx.shared:
        ctx.shared["ggn_operator"] = ctx.operators.build(GGNOperator, ctx.model, ctx.loss_fn,
                                                         ctx.train)
    return ctx.shared["ggn_operator"]


class GGNGroup(_Group):
    """``ggn/eig_1 … eig_2k`` (warm-started, the context's solver settings), eq. 5 between the
    top-k of ``H`` and ``G`` (``overlap/hessian_ggn``) and their principal angles."""

    name = "ggn"

    def __init__(self, k: int) -> None:
        self.k = k

    def names(self) -> list[str]:
        return ([f"ggn/eig_{i}" for i in range(1, 2 * self.k + 1)] + ["overlap/hessian_ggn"]
                + [f"angles/hessian_ggn_{i}" for i in range(1, self.k + 1)])

    def measure(self, ctx: Context) -> dict[str, float]:
        G = _ggn_operator(ctx)
        before = G.matvecs
        eig = ctx.solver.solve(G, 2 * self.k, ctx.warm, "ggn", ctx.seed)
        ctx.charge(BUCKET, G.matvecs - before, 0.0)
        row = {f"ggn/eig_{i + 1}": float(v) for i, v in enumerate(eig.values)}
        top, ggn_top = ctx.eig.vectors[:, :self.k], eig.vectors[:, :self.k]
        ctx.shared["ggn_top"] = ggn_top
        row["overlap/hessian_ggn"] = subspace_overlap(top, ggn_top)
        angles = principal_angles(top, ggn_top)
        row.update({f"angles/hessian_ggn_{i + 1}": float(a) for i, a in enumerate(angles)})
        return row


class ClassMeansGroup(_Group):
    """``overlap/classmeans_hessian`` (eq. 5 between the span of the ``C`` class-mean
    gradients and ``H``'s top-k), ``classmeans/rank`` and, with the GGN group,
    ``overlap/classmeans_ggn``."""

    name = "class_means"

    def __init__(self, classes: int | None, with_ggn: bool) -> None:
        self.classes, self.with_ggn = classes, with_ggn

    def names(self) -> list[str]:
        cols = ["overlap/classmeans_hessian", "classmeans/rank"]
        return [*cols, "overlap/classmeans_ggn"] if self.with_ggn else cols

    def measure(self, ctx: Context) -> dict[str, float]:
        G = _ggn_operator(ctx)
        before = G.matvecs
        span = class_mean_basis(class_gradient_means(G, self.classes, cross_class=False))
        ctx.charge(BUCKET, G.matvecs - before, 0.0)
        row = {"classmeans/rank": float(span.shape[1]),
               "overlap/classmeans_hessian": subspace_overlap(span, ctx.eig.vectors[:, :ctx.k])}
        if "ggn_top" in ctx.shared:
            row["overlap/classmeans_ggn"] = subspace_overlap(span, ctx.shared["ggn_top"])
        return row


class SharpnessGroup(_Group):
    """``sharpness/threshold`` and ``/ratio``, ``preconditioned/eig_1 … eig_k`` and
    ``preconditioned/update_share`` of the loop's optimizer (module docstring)."""

    name = "sharpness"

    def __init__(self, k: int, optimizer: torch.optim.Optimizer) -> None:
        self.k, self.optimizer = k, optimizer
        self.adaptive = type(optimizer).__name__ != "SGD"
        self.seen: tuple[int, torch.Tensor] | None = None  # (step, θ) of the last observe
        self.last_update_from: tuple[int, torch.Tensor] | None = None  # the one before

    def names(self) -> list[str]:
        return (["sharpness/threshold", "sharpness/ratio"]
                + [f"preconditioned/eig_{i}" for i in range(1, self.k + 1)]
                + ["preconditioned/update_share"])

    def observe(self, model: torch.nn.Module, step: int) -> None:
        """Called at every step, measured or not: keep ``θ_step`` (and the previous step's
        parameters, for the update share at ``step``)."""
        if self.seen is None or self.seen[0] != step:
            self.last_update_from, self.seen = self.seen, (step, flat_parameters(model))

    def measure(self, ctx: Context) -> dict[str, float]:
        threshold = _threshold(self.optimizer)
        row = {"sharpness/threshold": threshold}
        if self.adaptive and not self.optimizer.state:  # no second moments yet: no P
            row.update({f"preconditioned/eig_{i}": math.nan for i in range(1, self.k + 1)})
            row["sharpness/ratio"] = row["preconditioned/update_share"] = math.nan
            return row
        op, values, top = None, ctx.eig.values, ctx.eig.vectors[:, :self.k]
        if self.adaptive:
            op = PreconditionedOperator(ctx.operators.hessian(ctx.model, ctx.loss_fn, ctx.train),
                                        self.optimizer, first_moment_correction=True)
            eig = ctx.solver.solve(op, self.k, ctx.warm, "preconditioned", ctx.seed,
                                   start="subspace")
            values, top = eig.values, eig.vectors
            ctx.charge(BUCKET, op.matvecs, 0.0)
        row.update({f"preconditioned/eig_{i + 1}": float(v)
                    for i, v in enumerate(values[:self.k])})
        row["sharpness/ratio"] = float(values[0]) / threshold
        row["preconditioned/update_share"] = self._update_share(ctx.model, op, top, ctx.step)
        return row

    def _update_share(self, model: torch.nn.Module, op: PreconditionedOperator | None,
                      top: torch.Tensor, step: int) -> float:
        """Eq. 2 on the update ``θ_step − θ_{step−1}`` (in ``op``'s coordinates, ``P^{1/2} Δθ``;
        ``op=None``: ``P = 1``); NaN when ``θ_{step−1}`` was not seen or the update is zero."""
        if self.last_update_from is None or self.last_update_from[0] != step - 1:
            return math.nan
        delta = flat_parameters(model).to(top) - self.last_update_from[1].to(top)
        if op is not None:
            delta = op.to_preconditioned(delta)
        return top_fraction(delta, top) if float(delta.norm()) > 0 else math.nan


def curvature_settings(groups: list[Any]) -> dict[str, Any]:
    """What the curvature groups measure, for the run's ``config.json``
    (``tracker.curvature``)."""
    names = {g.name for g in groups}
    sharp = next((g for g in groups if isinstance(g, SharpnessGroup)), None)
    return {"ggn": "ggn" in names, "class_means": "class_means" in names,
            "geometry": "geometry" in names,
            "optimizer": None if sharp is None else type(sharp.optimizer).__name__}


def _threshold(optimizer: torch.optim.Optimizer) -> float:
    """The optimizer's threshold now, NaN where there is none (a learning rate of 0 at the end
    of a decay or the start of a warm-up; groups a scheduler moved apart)."""
    try:
        return sharpness_threshold(optimizer)
    except ValueError:
        return math.nan


def _geometry(before: torch.Tensor, now: torch.Tensor) -> dict[str, float]:
    angles = principal_angles(before, now)
    moved = eigenvector_displacement(before, now)
    row = {f"angles/previous_{i + 1}": float(a) for i, a in enumerate(angles)}
    row.update({f"displacement/hessian_{i + 1}": float(d) for i, d in enumerate(moved)})
    return row


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    """The measured parameters (every one that requires grad, ``named_parameters`` order)."""
    return torch.cat([p.detach().reshape(-1) for _, p in select_parameters(model, None)]).clone()
