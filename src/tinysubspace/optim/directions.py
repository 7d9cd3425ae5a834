"""What a projected optimizer does with a gradient: keep it (:class:`PlainGradient`), project it
on the top subspace or its complement, apply low-rank Newton, scale, or switch on ``f_top``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tinysubspace.optim.projections import lowrank_newton_direction, project_bulk, project_top
from tinysubspace.optim.subspace import SubspaceBasis

__all__ = ["BulkProjection", "Direction", "LowRankNewton", "PlainGradient", "Scaled",
           "SwitchOnTopFraction", "TopProjection"]


class Direction(Protocol):
    """``direction(g, basis) -> d``: the update direction from the gradient and the basis."""

    def __call__(self, g: torch.Tensor, basis: SubspaceBasis) -> torch.Tensor: ...


@dataclass(frozen=True)
class PlainGradient:
    """``d = g`` (plain SGD; the basis is not used)."""

    def __call__(self, g: torch.Tensor, basis: SubspaceBasis) -> torch.Tensor:
        return g


@dataclass(frozen=True)
class TopProjection:
    """``d = V Vᵀ g`` (Dom-SGD)."""

    def __call__(self, g: torch.Tensor, basis: SubspaceBasis) -> torch.Tensor:
        return project_top(g, basis.vectors)


@dataclass(frozen=True)
class BulkProjection:
    """``d = (I − V Vᵀ) g`` (Bulk-SGD)."""

    def __call__(self, g: torch.Tensor, basis: SubspaceBasis) -> torch.Tensor:
        return project_bulk(g, basis.vectors)


@dataclass(frozen=True)
class LowRankNewton:
    """``d = V (Λ + δ)⁻¹ Vᵀ g`` (eq. 11; see :func:`lowrank_newton_direction` for the guard)."""

    damping: float = 0.0
    rcond: float = 1e-6

    def __call__(self, g: torch.Tensor, basis: SubspaceBasis) -> torch.Tensor:
        return lowrank_newton_direction(g, basis.values, basis.vectors, self.damping, self.rcond)


@dataclass(frozen=True)
class Scaled:
    """``d = factor · direction(g, basis)`` (e.g. another learning rate after a switch)."""

    direction: Direction
    factor: float

    def __call__(self, g: torch.Tensor, basis: SubspaceBasis) -> torch.Tensor:
        return self.factor * self.direction(g, basis)


class SwitchOnTopFraction:
    """Plain SGD until the moving average of ``f_top = |Vᵀg|² / |g|²`` (eq. 2) over the last
    ``window`` steps reaches ``threshold``; ``after`` from then on (the switch is final).

    State (kept in the optimizer's ``state_dict``): the last ``window`` values of ``f_top`` and
    the number of calls at which it switched (``switched_at``, ``None`` before).

    Raises:
        ValueError: ``window`` below 1 or ``threshold`` outside ``[0, 1]``.
    """

    def __init__(self, after: Direction, threshold: float, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a fraction of |g|², in [0, 1]; got {threshold}")
        self.after, self.threshold, self.window = after, threshold, window
        self.history: list[float] = []
        self.calls = 0
        self.switched_at: int | None = None

    def __call__(self, g: torch.Tensor, basis: SubspaceBasis) -> torch.Tensor:
        self.calls += 1
        if self.switched_at is None:
            norm2 = float(g @ g)
            f_top = float((basis.vectors.T @ g).square().sum()) / norm2 if norm2 > 0 else 0.0
            self.history = [*self.history, f_top][-self.window:]
            if len(self.history) == self.window and self.moving_average >= self.threshold:
                self.switched_at = self.calls - 1
        return g if self.switched_at is None else self.after(g, basis)

    @property
    def moving_average(self) -> float:
        return sum(self.history) / len(self.history) if self.history else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "calls": self.calls,
                "switched_at": self.switched_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.calls = list(state["history"]), int(state["calls"])
        self.switched_at = state["switched_at"]
