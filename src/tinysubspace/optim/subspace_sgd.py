"""SGD whose step is a :class:`~tinysubspace.optim.directions.Direction` of the gradient in a
refreshed :class:`~tinysubspace.optim.subspace.HessianSubspace` (Dom-SGD, Bulk-SGD, low-rank
Newton).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from tinysubspace.optim.directions import Direction
from tinysubspace.optim.subspace import HessianSubspace

__all__ = ["SubspaceSGD"]


class SubspaceSGD(torch.optim.Optimizer):
    """SGD on a transformed gradient: ``θ ← θ − lr · d``, ``d = direction(g, basis)``.

    At each :meth:`step`: ``g`` is read from ``p.grad`` (what the training loop computed on the
    mini-batch) or from ``gradient()`` (e.g. the full-batch gradient); ``weight_decay · θ`` is
    added; the subspace is refreshed if due; ``d = direction(g, basis)``; with momentum ``μ``,
    ``b ← μ b + d`` and ``d = b``; then every parameter moves by ``−lr · d``.

    Args:
        params: the parameters, in the order of the operator's flat vectors
            (``model.parameters()`` order, the one
            :class:`~tinysubspace.curvature.hessian.HessianOperator`
            uses).
        subspace: the Hessian basis and its refresh schedule.
        direction: e.g. :class:`TopProjection`, :class:`BulkProjection`, :class:`LowRankNewton`,
            :class:`SwitchOnTopFraction`.
        lr: step size ``η`` (``1`` with :class:`LowRankNewton` is eq. 11).
        momentum: heavy-ball coefficient ``μ`` on ``d``.
        weight_decay: L2 coefficient added to ``g`` before the direction.
        gradient: ``gradient() -> (p,)`` tensor; ``None``: the concatenated ``p.grad``.

    Attributes:
        matvecs: Hessian-vector products used by the basis refreshes so far.
        full_gradients: how many times ``gradient()`` was called.

    Raises:
        ValueError: a non-positive ``lr`` or a negative ``momentum`` / ``weight_decay``.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], subspace: HessianSubspace,
                 direction: Direction, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0,
                 gradient: Callable[[], torch.Tensor] | None = None) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be non-negative, got {momentum} "
                             f"and {weight_decay}")
        super().__init__(list(params), {"lr": lr, "momentum": momentum,
                                        "weight_decay": weight_decay})
        if len(self.param_groups) != 1:
            raise ValueError("SubspaceSGD takes one parameter group (the flat vector of the "
                             f"operator), got {len(self.param_groups)}")
        self.subspace, self.direction, self.gradient = subspace, direction, gradient
        self.steps = 0
        self.full_gradients = 0
        self.buffer: torch.Tensor | None = None

    @property
    def matvecs(self) -> int:
        return self.subspace.matvecs

    @property
    def _params(self) -> list[torch.nn.Parameter]:
        return self.param_groups[0]["params"]

    def flat_gradient(self) -> torch.Tensor:
        """``g`` as one ``(p,)`` vector: ``gradient()`` or the concatenated ``p.grad``."""
        if self.gradient is not None:
            self.full_gradients += 1
            return self.gradient().detach()
        return torch.cat([torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                          if p.grad is None else p.grad.detach().reshape(-1)
                          for p in self._params])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        theta = torch.cat([p.detach().reshape(-1) for p in self._params])
        g = self.flat_gradient().to(theta.device)
        if group["weight_decay"]:
            g = g + group["weight_decay"] * theta.to(g.dtype)
        basis = self.subspace.update(self.steps)
        d = self.direction(g.to(basis.vectors.device, basis.vectors.dtype), basis)
        if group["momentum"]:
            self.buffer = d if self.buffer is None else group["momentum"] * self.buffer + d
            d = self.buffer
        d = d.to(theta.device, theta.dtype)
        for p, part in zip(self._params, d.split([p.numel() for p in self._params]),
                           strict=True):
            p.add_(part.view_as(p), alpha=-group["lr"])
        self.steps += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        direction = getattr(self.direction, "state_dict", None)
        state["subspace_sgd"] = {"steps": self.steps, "full_gradients": self.full_gradients,
                                 "buffer": self.buffer, "subspace": self.subspace.state_dict(),
                                 "direction": direction() if direction else None}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        mine = state_dict.pop("subspace_sgd", None)
        if mine is None:
            raise ValueError("this state dict was not saved by SubspaceSGD (no 'subspace_sgd' "
                             "entry); it cannot restore the basis and step counter")
        super().load_state_dict(state_dict)
        self.steps, self.full_gradients = int(mine["steps"]), int(mine["full_gradients"])
        self.buffer = mine["buffer"]
        self.subspace.load_state_dict(mine["subspace"])
        if mine["direction"] is not None:
            self.direction.load_state_dict(mine["direction"])  # type: ignore[attr-defined]
