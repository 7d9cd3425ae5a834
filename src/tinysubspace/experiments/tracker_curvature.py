"""Curvature beyond the Hessian as tracker options (issue 15, docs/beyond-the-hessian.md).

:class:`CurvatureColumns` adds columns to each row of a
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
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812

from tinysubspace.curvature.class_means import class_gradient_means, class_mean_basis
from tinysubspace.curvature.ggn import GGNOperator
from tinysubspace.curvature.hessian import HessianOperator
from tinysubspace.curvature.layout import select_parameters
from tinysubspace.curvature.preconditioned import SUPPORTED, PreconditionedOperator
from tinysubspace.metrics import (
    eigenvector_displacement,
    principal_angles,
    subspace_overlap,
    top_fraction,
)
from tinysubspace.optim.stability import sharpness, sharpness_threshold

__all__ = ["CurvatureColumns", "check_curvature_options", "operator_factory"]


def operator_factory(model: torch.nn.Module, loss_fn: Any, data: Any,
                     engine: Any) -> Callable[[type], Any]:
    """``make(kind)``: an operator of class ``kind`` (``HessianOperator``, ``GGNOperator``) of
    ``model`` on ``data`` with the settings of the tracker's ``engine`` (dtype, mode, chunk
    size, distributed)."""
    settings = {"dtype": engine.dtype, "mode": engine.config.mode,
                "distributed": engine.distributed, "batch_size": engine.config.hvp_batch_size}

    def make(kind: type) -> Any:
        return kind(model, loss_fn, data, **settings)

    return make


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


class CurvatureColumns:
    """The optional columns of a tracker's rows (module docstring).

    Args:
        k: the tracker's top-k. tol: relative residual of every solve.
        ggn, class_means, geometry: which columns. classes: ``C`` for ``class_means``.
        optimizer: the optimizer for the sharpness, threshold and preconditioned columns.
    """

    def __init__(self, k: int, tol: float, *, ggn: bool = False, class_means: bool = False,
                 geometry: bool = False, classes: int | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.k, self.tol = k, tol
        self.ggn, self.class_means, self.geometry = bool(ggn), bool(class_means), bool(geometry)
        self.classes = classes
        self.set_optimizer(optimizer)
        self.previous: dict[str, torch.Tensor | None] = {"ggn": None, "preconditioned": None}
        self.seen: tuple[int, torch.Tensor] | None = None  # (step, θ) of the last on_step
        self.last_update_from: tuple[int, torch.Tensor] | None = None  # the one before

    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Track ``optimizer`` (checked by :func:`check_curvature_options`)."""
        self.optimizer = optimizer
        self.adaptive = optimizer is not None and type(optimizer).__name__ != "SGD"

    def settings(self) -> dict[str, Any]:
        """What is measured, for the run's ``config.json`` (``tracker.curvature``)."""
        opt = self.optimizer
        return {"ggn": self.ggn, "class_means": self.class_means, "geometry": self.geometry,
                "optimizer": None if opt is None else type(opt).__name__}

    @property
    def active(self) -> bool:
        return self.ggn or self.class_means or self.geometry or self.optimizer is not None

    def columns(self) -> list[str]:
        k, cols = self.k, []
        if self.geometry:
            cols += [f"angles/previous_{i}" for i in range(1, k + 1)]
            cols += [f"displacement/hessian_{i}" for i in range(1, k + 1)]
        if self.ggn:
            cols += [f"ggn/eig_{i}" for i in range(1, 2 * k + 1)]
            cols += ["overlap/hessian_ggn"] + [f"angles/hessian_ggn_{i}" for i in range(1, k + 1)]
        if self.class_means:
            cols += ["overlap/classmeans_hessian", "classmeans/rank"]
            cols += ["overlap/classmeans_ggn"] if self.ggn else []
        if self.optimizer is not None:
            cols += ["sharpness/threshold", "sharpness/ratio"]
            cols += [f"preconditioned/eig_{i}" for i in range(1, k + 1)]
            cols += ["preconditioned/update_share"]
        return [*cols, "cost/curvature_matvecs", "cost/curvature_seconds"] if cols else []

    def observe(self, model: torch.nn.Module, step: int) -> None:
        """Called at every ``on_step(step)``, before measuring: keep ``θ_step`` (and the
        previous step's parameters, for the update share at ``step``)."""
        if self.optimizer is not None and (self.seen is None or self.seen[0] != step):
            self.last_update_from, self.seen = self.seen, (step, _flat_parameters(model))

    def measure(self, model: torch.nn.Module, make: Callable[[type], Any], V: torch.Tensor,
                values: torch.Tensor, previous_V: torch.Tensor | None, step: int,
                seed: int) -> dict[str, float]:
        """The columns at ``step``. ``make(kind)`` builds an operator of class ``kind``
        (``HessianOperator``, ``GGNOperator``) of ``model`` on the tracker's data with its
        settings; ``V``/``values`` are the Hessian's top ``2k`` eigenpairs, ``previous_V`` the
        last measurement's (``None`` at the first)."""
        started, row, matvecs = time.perf_counter(), {}, 0
        top = V[:, :self.k]
        if self.geometry and previous_V is not None:
            row.update(_geometry(previous_V[:, :self.k].to(top), top))
        ggn_top = None
        if self.ggn or self.class_means:
            G = make(GGNOperator)
            if self.ggn:
                ggn_top = self._ggn(G, top, seed, row)
            if self.class_means:
                row.update(self._class_means(G, top, ggn_top))
            matvecs += G.matvecs
        if self.optimizer is not None:
            matvecs += self._preconditioned(model, make, values, top, step, seed, row)
        row["cost/curvature_matvecs"] = matvecs
        row["cost/curvature_seconds"] = time.perf_counter() - started
        return row

    def _ggn(self, G: GGNOperator, top: torch.Tensor, seed: int,
             row: dict[str, float]) -> torch.Tensor:
        eig = sharpness(G, self.previous["ggn"], k=2 * self.k, tol=self.tol, seed=seed,
                        warm="auto")
        self.previous["ggn"] = eig.vectors.detach().clone()
        row.update({f"ggn/eig_{i + 1}": float(v) for i, v in enumerate(eig.values)})
        ggn_top = eig.vectors[:, :self.k]
        row["overlap/hessian_ggn"] = subspace_overlap(top, ggn_top)
        angles = principal_angles(top, ggn_top)
        row.update({f"angles/hessian_ggn_{i + 1}": float(a) for i, a in enumerate(angles)})
        return ggn_top

    def _class_means(self, G: GGNOperator, top: torch.Tensor,
                     ggn_top: torch.Tensor | None) -> dict[str, float]:
        span = class_mean_basis(class_gradient_means(G, self.classes, cross_class=False))
        row = {"classmeans/rank": float(span.shape[1]),
               "overlap/classmeans_hessian": subspace_overlap(span, top)}
        if ggn_top is not None:
            row["overlap/classmeans_ggn"] = subspace_overlap(span, ggn_top)
        return row

    def _preconditioned(self, model: torch.nn.Module, make: Callable[[type], Any],
                        values: torch.Tensor, top: torch.Tensor, step: int, seed: int,
                        row: dict[str, float]) -> int:
        """Threshold, preconditioned top-k and the last update's share; returns products."""
        threshold = _threshold(self.optimizer)
        row["sharpness/threshold"] = threshold
        if self.adaptive and not self.optimizer.state:  # no second moments yet: no P
            row.update({f"preconditioned/eig_{i}": math.nan for i in range(1, self.k + 1)})
            row["sharpness/ratio"] = row["preconditioned/update_share"] = math.nan
            return 0
        op, matvecs = None, 0
        if self.adaptive:
            op = PreconditionedOperator(make(HessianOperator), self.optimizer,
                                        first_moment_correction=True)
            eig = sharpness(op, self.previous["preconditioned"], k=self.k, tol=self.tol,
                            seed=seed)
            self.previous["preconditioned"] = eig.vectors.detach().clone()
            values, top, matvecs = eig.values, eig.vectors, op.matvecs
        row.update({f"preconditioned/eig_{i + 1}": float(v)
                    for i, v in enumerate(values[:self.k])})
        row["sharpness/ratio"] = float(values[0]) / threshold
        row["preconditioned/update_share"] = self._update_share(model, op, top, step)
        return matvecs

    def _update_share(self, model: torch.nn.Module, op: PreconditionedOperator | None,
                      top: torch.Tensor, step: int) -> float:
        """Eq. 2 on the update ``θ_step − θ_{step−1}`` (in ``op``'s coordinates, ``P^{1/2} Δθ``;
        ``op=None``: ``P = 1``); NaN when ``θ_{step−1}`` was not seen or the update is zero."""
        if self.last_update_from is None or self.last_update_from[0] != step - 1:
            return math.nan
        delta = _flat_parameters(model).to(top) - self.last_update_from[1].to(top)
        if op is not None:
            delta = op.to_preconditioned(delta)
        return top_fraction(delta, top) if float(delta.norm()) > 0 else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {"previous": dict(self.previous)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.previous.update(state.get("previous", {}))


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


def _flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    """The measured parameters (every one that requires grad, ``named_parameters`` order)."""
    return torch.cat([p.detach().reshape(-1) for _, p in select_parameters(model, None)]).clone()
