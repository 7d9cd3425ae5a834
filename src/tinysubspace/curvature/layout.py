"""Choosing parameters and laying them out as one flat vector.

A parameter-space vector is 1-D of length ``p``: the chosen parameters flattened and concatenated
in ``model.named_parameters()`` order (DESIGN.md, conventions).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["ParameterLayout", "select_parameters"]


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and offsets of the parameters that make up a flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(shape).numel()) for shape in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start index of each parameter in the flat vector."""
        starts, total = [], 0
        for size in self.sizes:
            starts.append(total)
            total += size
        return tuple(starts)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def slices(self) -> list[slice]:
        return [slice(start, start + size) for start, size in zip(self.offsets, self.sizes,
                                                                   strict=True)]

    def split(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat ``(p,)`` vector into a dict of parameter-shaped views."""
        if vector.shape != (self.numel,):
            raise ValueError(f"expected a vector of shape ({self.numel},), got "
                             f"{tuple(vector.shape)}")
        return {name: vector[part].view(shape)
                for name, part, shape in zip(self.names, self.slices(), self.shapes, strict=True)}

    def flatten(self, tensors: Iterable[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
        """Concatenate parameter-shaped tensors (``None`` counts as zeros) into a flat vector."""
        parts = [torch.zeros(size, dtype=like.dtype, device=like.device) if t is None
                 else t.reshape(-1) for t, size in zip(tensors, self.sizes, strict=True)]
        return torch.cat(parts) if parts else like.new_zeros(0)

    def owner(self, index: int) -> str:
        """The name of the parameter that holds flat index ``index``."""
        for name, part in zip(self.names, self.slices(), strict=True):
            if part.start <= index < part.stop:
                return name
        raise IndexError(f"index {index} is outside a vector of length {self.numel}")


def select_parameters(model: torch.nn.Module,
                      params: Iterable[str | torch.nn.Parameter | torch.Tensor] | None
                      ) -> list[tuple[str, torch.nn.Parameter]]:
    """The ``(name, parameter)`` pairs to differentiate, in ``named_parameters()`` order.

    Args:
        model: the module.
        params: ``None`` for every parameter that requires grad; otherwise names (as in
            ``named_parameters()``) or the parameter tensors themselves (a single name or
            tensor is taken as a list of one). A named parameter is
            measured whether or not it requires grad: the Hessian with respect to it is well
            defined even if training keeps it fixed.

    Raises:
        ValueError: an unknown name, a tensor that is not a parameter of ``model``, a parameter
            named twice, or an empty selection.
    """
    named = list(model.named_parameters())
    if isinstance(params, (str, torch.Tensor)):  # one name or one tensor, not an iterable of them
        params = [params]
    if params is None:
        chosen = [(name, p) for name, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("the model has no parameter that requires grad; pass params= to "
                             "choose which parameters to measure")
        return chosen
    by_name = dict(named)
    by_id = {id(p): name for name, p in named}
    wanted: set[str] = set()
    for item in params:
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"unknown parameter name {item!r}; the model has: "
                                 f"{', '.join(by_name) or '(none)'}")
            name = item
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError(f"a tensor of shape {tuple(item.shape)} in params is not a "
                                 "parameter of the model")
            name = by_id[id(item)]
        else:
            raise TypeError(f"params must hold parameter names or tensors, got "
                            f"{type(item).__name__}")
        if name in wanted:
            raise ValueError(f"parameter {name!r} is named twice in params")
        wanted.add(name)
    if not wanted:
        raise ValueError("params is empty; pass None to measure every trainable parameter")
    return [(name, p) for name, p in named if name in wanted]
