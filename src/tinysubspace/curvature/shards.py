"""Vectors sharded like an FSDP2 model's parameters: which rows a rank holds, and the inner
product over ranks.

Under FSDP2 (``fully_shard``) every parameter is a ``DTensor`` of which each rank holds a shard
(rows of dimension 0). A parameter-space vector is held the same way: on rank ``r`` it is the
concatenation of the rank's local shards of each parameter (``p_r`` numbers, ``Σ_r p_r = p``).
Inner products and norms are sums over ranks,

.. math::  \\langle u, v \\rangle = \\sum_r u_r^\\top v_r,

which :class:`ShardedSpace` forms (every solver of :mod:`tinysubspace.linalg` takes its inner
products from an operator's ``vector_space``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tinysubspace.operator import VectorSpace

__all__ = ["ShardedSpace", "dtensor_type", "global_index", "is_sharded_model"]


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or ``None`` for a torch without it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return None
    return DTensor


def is_sharded_model(model: torch.nn.Module) -> bool:
    """Whether any trainable parameter of ``model`` is a ``DTensor`` (FSDP2's ``fully_shard``)."""
    kind = dtensor_type()
    return kind is not None and any(isinstance(p, kind) for p in model.parameters()
                                    if p.requires_grad)


class ShardedSpace(VectorSpace):
    """Vectors held as local rows on each rank: inner products all-reduced over ``group``.

    Args:
        dim: the global dimension ``p``.
        index: ``(p_r,)`` int64, the global positions (``named_parameters`` order, each parameter
            flattened) of the rows this rank holds.
        group: the process group of the shards.
    """

    sharded = True

    def __init__(self, dim: int, index: torch.Tensor, group: Any = None) -> None:
        super().__init__(dim)
        self.index, self.group = index, group

    def reduce(self, local: torch.Tensor) -> torch.Tensor:
        """``Σ_ranks local`` (every rank gets the same numbers)."""
        total = local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def gram(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``Σ_ranks A_rᵀ B_r``."""
        return self.reduce(super().gram(A, B))

    def local_rows(self, block: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global ``(p, ·)`` (or ``(p,)``) tensor."""
        return block[self.index.to(block.device)]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The global ``(p, ·)`` tensor from every rank's rows (e.g. eigenvectors of a small
        model; every rank gets it, and must call this together)."""
        full = local.new_zeros((self.dim, *local.shape[1:]))
        full[self.index.to(local.device)] = local
        return self.reduce(full)


def global_index(params: list[torch.Tensor]) -> torch.Tensor:
    """Global flat positions of this rank's rows: each parameter's index tensor sharded the same
    way as the parameter (``distribute_tensor`` with its mesh and placements)."""
    from torch.distributed.tensor import distribute_tensor

    pieces, offset = [], 0
    for p in params:
        numbers = torch.arange(offset, offset + p.numel(), dtype=torch.int64,
                               device=p.device).reshape(p.shape)
        pieces.append(distribute_tensor(numbers, p.device_mesh, p.placements).to_local()
                      .reshape(-1))
        offset += p.numel()
    return torch.cat(pieces)
