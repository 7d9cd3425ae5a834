"""The warm-start state of a run: the last eigenvectors of every named solve, in one object.

Between two measurements ``t`` and ``t'`` of a training run the top eigenvectors move little
(PAPER.txt section 3), so each solve at ``t'`` starts from the vectors ``V_t`` of the same solve
at ``t`` (:func:`~tinysubspace.linalg.warm_start.track_eigenpairs`, ``init=V_t``). A run has
several such solves (the Hessian's top ``2k``, the GGN's, the preconditioned Hessian's, a
projected optimizer's refreshed basis); :class:`WarmStart` keeps their vectors by name, so
that there is one place to read, update, save and restore them (STYLE.md point 6: the state is
explicit; the solver still takes it as an argument).

>>> import torch
>>> warm = WarmStart()
>>> warm.get("hessian") is None
True
>>> warm.update("hessian", torch.eye(4, 2))
>>> warm.get("hessian").shape
torch.Size([4, 2])
>>> WarmStart.from_state_dict(warm.state_dict()).names()
['hessian']

A solve's result may carry more than vectors to its next solve: the amortised multiplicity
check's guard (``Eigenpairs.guard``, :mod:`tinysubspace.linalg.amortised`) and the measured
pass cost that ``warm="auto"`` chose by (``Eigenpairs.pass_cost``). :meth:`WarmStart.update`
given an :class:`Eigenpairs` keeps them, :meth:`WarmStart.previous` hands them back with the
vectors, and :meth:`WarmStart.state_dict` stores them as plain tensors, ints and floats (under
the key ``"_carried"``, present only when something is carried), so a resumed run passes the
same guard and chooses by the same cost.
"""

from __future__ import annotations

from typing import Any

import torch

from tinysubspace.linalg.deflation import GuardState
from tinysubspace.linalg.lanczos import Eigenpairs
from tinysubspace.linalg.pass_cost import PassCost

__all__ = ["WarmStart"]


CARRIED_KEY = "_carried"
"""The entry of :meth:`WarmStart.state_dict` holding the carried guards and pass costs."""


class WarmStart:
    """The previous ``(p, m)`` eigenvectors of each named solve (``None``: none yet, a cold
    start)."""

    def __init__(self) -> None:
        self._vectors: dict[str, torch.Tensor] = {}
        self._carried: dict[str, tuple[GuardState | None, PassCost | None]] = {}

    def get(self, name: str) -> torch.Tensor | None:
        """The vectors of the last solve called ``name`` (``None`` before the first)."""
        return self._vectors.get(name)

    def update(self, name: str, vectors: Any) -> None:
        """Keep ``vectors`` (a ``(p, m)`` tensor or anything with ``.vectors``) for ``name``'s
        next solve; ``None`` forgets them.

        Raises:
            ValueError: ``vectors`` is not a 2-D tensor.
        """
        if vectors is None:
            self._vectors.pop(name, None)
            self._carried.pop(name, None)
            return
        guard, cost = getattr(vectors, "guard", None), getattr(vectors, "pass_cost", None)
        self._carried.pop(name, None)
        if guard is not None or isinstance(cost, PassCost):
            self._carried[name] = (guard, cost if isinstance(cost, PassCost) else None)
        vectors = getattr(vectors, "vectors", vectors)
        if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2:
            shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors)
            raise ValueError(f"a warm start is a (p, m) tensor of eigenvectors, got {shape} "
                             f"for {name!r}")
        self._vectors[name] = vectors.detach().clone()

    def previous(self, name: str) -> Eigenpairs | torch.Tensor | None:
        """What the next solve of ``name`` starts from: its vectors, or, when the last result
        carried a guard or a pass cost, an :class:`Eigenpairs` with those vectors and them (its
        values and residuals NaN: only ``vectors``, ``guard`` and ``pass_cost`` are read)."""
        vectors = self._vectors.get(name)
        if vectors is None or name not in self._carried:
            return vectors
        guard, cost = self._carried[name]
        nan = torch.full((vectors.shape[1],), float("nan"), dtype=vectors.dtype)
        return Eigenpairs(nan, vectors, nan.clone(), 0, False, guard=guard, pass_cost=cost)

    def names(self) -> list[str]:
        """The solves that have vectors, sorted."""
        return sorted(self._vectors)

    def state_dict(self) -> dict[str, Any]:
        """``{name: vectors}``, and ``"_carried": {name: {"guard_vector", "since_full", "c0",
        "c1"}}`` when a guard or pass cost is carried (tensors, ints, floats and ``None``:
        loadable with ``torch.load(weights_only=True)``)."""
        state: dict[str, Any] = dict(self._vectors)
        if self._carried:
            state[CARRIED_KEY] = {name: _carried_state(*pair)
                                  for name, pair in self._carried.items()}
        return state

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Replace the state by ``state`` (``None`` or ``{}``: every solve starts cold; an entry
        ``None`` is a cold start for that solve).

        Raises:
            ValueError: an entry that is neither ``None`` nor a ``(p, m)`` tensor.
        """
        self._vectors, self._carried = {}, {}
        state = dict(state or {})
        carried = state.pop(CARRIED_KEY, None) or {}
        for name, vectors in state.items():
            self.update(name, vectors)
        for name, entry in carried.items():
            if name in self._vectors:
                self._carried[name] = _carried_from(entry)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any] | None) -> WarmStart:
        warm = cls()
        warm.load_state_dict(state)
        return warm


def _carried_state(guard: GuardState | None, cost: PassCost | None) -> dict[str, Any]:
    """A carried guard and pass cost as plain values (``None`` where absent)."""
    return {"guard_vector": None if guard is None or guard.vector is None
            else guard.vector.detach().clone(),
            "since_full": None if guard is None else int(guard.since_full),
            "c0": None if cost is None else float(cost.c0),
            "c1": None if cost is None else float(cost.c1)}


def _carried_from(entry: dict[str, Any]) -> tuple[GuardState | None, PassCost | None]:
    """The inverse of :func:`_carried_state`."""
    guard = None if entry.get("since_full") is None else \
        GuardState(entry.get("guard_vector"), int(entry["since_full"]))
    cost = None if entry.get("c0") is None else PassCost(float(entry["c0"]), float(entry["c1"]))
    return guard, cost
