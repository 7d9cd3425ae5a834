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
passes a threshold and another direction afterwards). ``OPTIMIZERS`` builds them from an
:class:`~tinysubspace.config.OptimConfig` for the training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .eigen import Eigenpairs
from .tracking import track_eigenpairs

__all__ = [
    "OPTIMIZERS",
    "BulkProjection",
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

Solver = Callable[[Any, int, "torch.Tensor | None", float, int], Eigenpairs]


# --------------------------------------------------------------------- the maths, pure functions
def project_top(g: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``P_top g = V Vᵀ g`` (eq. 1): the part of ``g`` in ``span(V)``, ``V`` orthonormal ``(p, k)``.

    >>> V = torch.tensor([[1.0], [0.0]]); project_top(torch.tensor([3.0, 4.0]), V)
    tensor([3., 0.])
    """
    return V @ (V.T @ g)


def project_bulk(g: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``(I − V Vᵀ) g``: the part of ``g`` orthogonal to ``span(V)`` (the "bulk").

    >>> V = torch.tensor([[1.0], [0.0]]); project_bulk(torch.tensor([3.0, 4.0]), V)
    tensor([0., 4.])
    """
    return g - V @ (V.T @ g)


def lowrank_newton_direction(g: torch.Tensor, values: torch.Tensor, V: torch.Tensor,
                             damping: float = 0.0, rcond: float = 1e-6) -> torch.Tensor:
    """``V (Λ + δ)⁻¹ Vᵀ g``: Newton's step inside ``span(V)`` (eq. 11 with damping ``δ``).

    Guard: a direction whose damped curvature ``λ_i + δ`` is not above ``rcond · max_j |λ_j|``
    (a non-positive or vanishing eigenvalue, where Newton would climb or jump) is left out, as a
    pseudo-inverse does; the step is then zero along it.

    Args:
        g: ``(p,)`` gradient.
        values: ``(k,)`` eigenvalues ``λ_i`` belonging to the columns of ``V``.
        V: ``(p, k)`` orthonormal eigenvectors.
        damping: ``δ ≥ 0`` added to every eigenvalue.
        rcond: relative floor of the curvatures kept.

    Raises:
        ValueError: negative ``damping`` or ``rcond``, or ``values`` not of length ``k``.

    >>> V = torch.eye(3)[:, :2]; lam = torch.tensor([4.0, -1.0])
    >>> lowrank_newton_direction(torch.tensor([8.0, 1.0, 5.0]), lam, V)
    tensor([2., 0., 0.])
    """
    if damping < 0 or rcond < 0:
        raise ValueError(f"damping and rcond must be non-negative, got {damping} and {rcond}")
    if values.shape != (V.shape[1],):
        raise ValueError(f"values must have shape ({V.shape[1]},) to match V, got "
                         f"{tuple(values.shape)}")
    curvature = values.to(g.dtype) + damping
    floor = rcond * float(values.abs().max()) if values.numel() else 0.0
    inverse = torch.where(curvature > floor, 1.0 / curvature, torch.zeros_like(curvature))
    return V @ (inverse * (V.T @ g))


# ------------------------------------------------------------------------------- the subspace
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
    :class:`~tinysubspace.hessian.HessianOperator` over the training set or a fixed subset) and
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
            :func:`~tinysubspace.tracking.track_eigenpairs` (cold single-vector Lanczos first,
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
        previous = None if self.basis is None else self.basis.vectors.to(op.device, op.dtype)
        before = op.matvecs
        eig = self.solver(op, self.k, previous, self.tol, self.seed + step)
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


# ------------------------------------------------------------------------------ the directions
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


# ------------------------------------------------------------------------------- the optimizer
class SubspaceSGD(torch.optim.Optimizer):
    """SGD on a transformed gradient: ``θ ← θ − lr · d``, ``d = direction(g, basis)``.

    At each :meth:`step`: ``g`` is read from ``p.grad`` (what the training loop computed on the
    mini-batch) or from ``gradient()`` (e.g. the full-batch gradient); ``weight_decay · θ`` is
    added; the subspace is refreshed if due; ``d = direction(g, basis)``; with momentum ``μ``,
    ``b ← μ b + d`` and ``d = b``; then every parameter moves by ``−lr · d``.

    Args:
        params: the parameters, in the order of the operator's flat vectors
            (``model.parameters()`` order, the one :class:`~tinysubspace.hessian.HessianOperator`
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


# ------------------------------------------------------------------- the training loop's registry
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
