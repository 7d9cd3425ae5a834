"""The training loop's projected optimizers, built from an
:class:`~tinysubspace.experiments.config.OptimConfig` (``optim.name`` → factory)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tinysubspace.optim import (
    BulkProjection,
    Direction,
    HessianSubspace,
    LowRankNewton,
    Scaled,
    SubspaceSGD,
    SwitchOnTopFraction,
    TopProjection,
)

__all__ = ["OPTIMIZERS", "PROJECTIONS"]


PROJECTIONS = ("minibatch", "fullbatch")


def _training_data(context: dict[str, Any], subset: int | None) -> tuple[torch.Tensor, ...]:
    X, Y = context["problem"].tensors("train")
    if subset is None or subset >= len(X):
        return X, Y
    if subset < 1:
        raise ValueError(f"optim.refresh_subset must be at least 1 (or unset), got {subset}")
    generator = torch.Generator().manual_seed(int(context.get("seed", 0)))
    index = torch.randperm(len(X), generator=generator)[:subset].to(X.device)
    return X[index], Y[index]


def _build(model: torch.nn.Module, config: Any, context: dict[str, Any],
           direction: Direction) -> SubspaceSGD:
    """A :class:`SubspaceSGD` on the run's training set, as ``config`` (an OptimConfig) says."""
    if config.project not in PROJECTIONS:
        raise ValueError(f"optim.project must be one of {', '.join(PROJECTIONS)}, got "
                         f"{config.project!r}")
    tracker = context["tracker"]
    refresh_data = _training_data(context, config.refresh_subset)
    subspace = HessianSubspace(lambda: tracker.operator(model, refresh_data), config.k,
                               config.refresh_every, tol=config.refresh_tol,
                               seed=int(context.get("seed", 0)))
    gradient = None
    if config.project == "fullbatch":
        train = context["problem"].tensors("train")

        def gradient() -> torch.Tensor:
            return tracker.operator(model, train).loss_and_gradient()[1]

    params = [p for p in model.parameters() if p.requires_grad]
    return SubspaceSGD(params, subspace, direction, lr=config.lr, momentum=config.momentum,
                       weight_decay=config.weight_decay, gradient=gradient)


def _no_switch(config: Any) -> None:
    if config.switch_threshold or config.switch_lr is not None:
        raise ValueError(f"optim.switch_threshold / optim.switch_lr are set but optim.name="
                         f"{config.name!r} does not switch; use 'switch-{config.name}' for SGD "
                         "followed by the projected optimizer")


def _dom_sgd(model, config, context) -> SubspaceSGD:
    _no_switch(config)
    return _build(model, config, context, TopProjection())


def _bulk_sgd(model, config, context) -> SubspaceSGD:
    _no_switch(config)
    return _build(model, config, context, BulkProjection())


def _lowrank_newton(model, config, context) -> SubspaceSGD:
    _no_switch(config)
    return _build(model, config, context, LowRankNewton(damping=config.damping))


def _switch(after: Callable[[Any], Direction]) -> Callable[..., SubspaceSGD]:
    """Factory of plain SGD (``lr``) switching to ``after`` (at ``switch_lr``, default ``lr``)."""
    def factory(model, config, context) -> SubspaceSGD:
        direction = after(config)
        if config.switch_lr is not None and config.switch_lr != config.lr:
            if not config.switch_lr > 0:
                raise ValueError(f"optim.switch_lr must be positive, got {config.switch_lr}")
            direction = Scaled(direction, config.switch_lr / config.lr)
        switch = SwitchOnTopFraction(direction, config.switch_threshold, config.switch_window)
        return _build(model, config, context, switch)
    return factory


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "dom-sgd": _dom_sgd,
    "bulk-sgd": _bulk_sgd,
    "lowrank-newton": _lowrank_newton,
    "switch-dom-sgd": _switch(lambda config: TopProjection()),
    "switch-bulk-sgd": _switch(lambda config: BulkProjection()),
    "switch-lowrank-newton": _switch(lambda config: LowRankNewton(damping=config.damping)),
}
"""``optim.name`` → ``factory(model, optim_config, context) -> Optimizer`` for the training loop
(``context``: ``"problem"``, ``"tracker"``, optional ``"seed"``)."""
