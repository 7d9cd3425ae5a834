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
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["WarmStart"]


class WarmStart:
    """The previous ``(p, m)`` eigenvectors of each named solve (``None``: none yet, a cold
    start)."""

    def __init__(self) -> None:
        self._vectors: dict[str, torch.Tensor] = {}

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
            return
        vectors = getattr(vectors, "vectors", vectors)
        if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2:
            shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors)
            raise ValueError(f"a warm start is a (p, m) tensor of eigenvectors, got {shape} "
                             f"for {name!r}")
        self._vectors[name] = vectors.detach().clone()

    def names(self) -> list[str]:
        """The solves that have vectors, sorted."""
        return sorted(self._vectors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: vectors}`` (tensors only: loadable with ``torch.load(weights_only=True)``)."""
        return dict(self._vectors)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Replace the state by ``state`` (``None`` or ``{}``: every solve starts cold; an entry
        ``None`` is a cold start for that solve).

        Raises:
            ValueError: an entry that is neither ``None`` nor a ``(p, m)`` tensor.
        """
        self._vectors = {}
        for name, vectors in (state or {}).items():
            self.update(name, vectors)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any] | None) -> WarmStart:
        warm = cls()
        warm.load_state_dict(state)
        return warm
