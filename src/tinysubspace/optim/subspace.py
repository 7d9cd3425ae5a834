"""The top-k Hessian subspace during training, refreshed every ``m`` steps by a warm-started
eigensolver (:func:`tinysubspace.linalg.warm_start.track_eigenpairs`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tinysubspace.linalg.lanczos import Eigenpairs
from tinysubspace.linalg.warm_start import track_eigenpairs
from tinysubspace.linalg.warm_state import WarmStart

__all__ = ["HessianSubspace", "Solver", "SubspaceBasis"]

WARM_NAME = "subspace"  # the refreshed basis's entry in its WarmStart
Solver = Callable[[Any, int, "torch.Tensor | None", float, int], Eigenpairs]


@dataclass(frozen=True)
class SubspaceBasis:
    """Top-k eigenpairs of the Hessian at optimizer step ``step`` (``vectors`` orthonormal)."""

    values: torch.Tensor  # (k,), descending
    vectors: torch.Tensor  # (p, k)
    step: int
    converged: bool = True


def _warm_solver(op, k: int, init: torch.Tensor | None, tol: float, seed: int) -> Eigenpairs:
    return track_eigenpairs(op, k, init, tol=tol, seed=seed)


class HessianSubspace:
    """The top-k eigenbasis of a Hessian, recomputed every ``refresh_every`` steps.

    Each refresh builds a fresh operator at the current parameters (``operator_at()``, e.g. a
    :class:`~tinysubspace.curvature.hessian.HessianOperator` over the training set or a fixed
    subset) and
    solves for its top ``k`` eigenpairs starting from the previous basis (a warm start: the
    basis moves slowly, PAPER.txt Fig. 2, so few products are needed).

    Args:
        operator_at: builds the symmetric operator at the current parameters.
        k: subspace dimension.
        refresh_every: steps between refreshes (``m``); the first is at step 0.
        tol: relative residual tolerance of the eigenpairs.
        seed: seed of the solver's random start (``seed + step`` at each refresh).
        solver: ``solver(op, k, init, tol, seed) -> Eigenpairs``; ``init`` is the previous
            basis (``None`` at the first refresh). Default:
            :func:`~tinysubspace.linalg.warm_start.track_eigenpairs` (cold single-vector Lanczos
            first,
            then warm-started).

    Attributes:
        basis: the current :class:`SubspaceBasis` (``None`` before the first refresh).
        matvecs: operator-vector products used by all refreshes so far (the HVP cost).
        refreshes: how many refreshes were done.

    Raises:
        ValueError: ``k`` or ``refresh_every`` below 1, or ``tol`` not positive.
    """

    def __init__(self, operator_at: Callable[[], Any], k: int, refresh_every: int,
                 tol: float = 1e-3, seed: int = 0, solver: Solver | None = None) -> None:
        if k < 1 or refresh_every < 1:
            raise ValueError(f"k and refresh_every must be at least 1, got k={k}, "
                             f"refresh_every={refresh_every}")
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        self.operator_at, self.k, self.refresh_every = operator_at, k, refresh_every
        self.tol, self.seed, self.solver = tol, seed, solver or _warm_solver
        self.basis: SubspaceBasis | None = None
        self.warm = WarmStart()  # the last refresh's vectors, the next one's start
        self.matvecs = 0
        self.refreshes = 0

    def due(self, step: int) -> bool:
        """Whether a refresh is scheduled at ``step`` (or no basis exists yet)."""
        return self.basis is None or (step % self.refresh_every == 0 and self.basis.step != step)

    def update(self, step: int) -> SubspaceBasis:
        """Refresh if due at ``step``; return the current basis."""
        if self.due(step):
            self.refresh(step)
        assert self.basis is not None
        return self.basis

    def refresh(self, step: int) -> SubspaceBasis:
        """Recompute the basis at the current parameters, warm-started from the previous one."""
        op = self.operator_at()
        previous = self.warm.get(WARM_NAME)
        if previous is not None:
            previous = previous.to(op.device, op.dtype)
        before = op.matvecs
        eig = self.solver(op, self.k, previous, self.tol, self.seed + step)
        self.warm.update(WARM_NAME, eig.vectors)
        self.matvecs += op.matvecs - before
        self.refreshes += 1
        self.basis = SubspaceBasis(eig.values.detach(), eig.vectors.detach(), step,
                                   bool(eig.converged))
        return self.basis

    def state_dict(self) -> dict[str, Any]:
        basis = self.basis
        return {"matvecs": self.matvecs, "refreshes": self.refreshes,
                "basis": None if basis is None else {"values": basis.values, "step": basis.step,
                                                     "vectors": basis.vectors,
                                                     "converged": basis.converged}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.matvecs, self.refreshes = int(state["matvecs"]), int(state["refreshes"])
        b = state["basis"]
        self.basis = None if b is None else SubspaceBasis(b["values"], b["vectors"],
                                                          int(b["step"]), bool(b["converged"]))
        self.warm.load_state_dict(None if b is None else {WARM_NAME: b["vectors"]})
