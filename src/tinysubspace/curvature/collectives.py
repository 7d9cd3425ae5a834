"""Many processes, one Hessian: the few ``torch.distributed`` pieces tinysubspace uses.

Each of ``R`` processes (ranks) holds a shard ``D_r`` of the data (``N_r`` examples, any sizes,
even zero). The Hessian operator sums, on each rank, the batch-size-weighted terms of its shard
and all-reduces them before dividing by the global count, so that

.. math::  H V = \\frac{1}{N} \\sum_{r} \\sum_{B_j \\subset D_r} n_j \\nabla^2 \\ell_j\\, V,
           \\qquad N = \\sum_r N_r,

exactly the single-process mean (DESIGN.md: "normalisation and distribution live in one
place"). An all-reduce hands every rank the same bits, so the deterministic maths that follows
(Rayleigh–Ritz, ``eigh``, orthogonalisation) agrees bit for bit on every rank, and seeded
random blocks are drawn on the CPU (identical everywhere).

Failures never hang: :func:`sum_across_ranks` first exchanges a small header (each rank's
status and fingerprints of what must agree), so an exception on one rank is raised on every
rank; a rank that dies or stalls outside a collective is caught by the process group's
timeout (:func:`tinysubspace.runtime.distributed.init_from_env`). Every function here is a no-op
(or the identity) in a single
process, so callers never branch on it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistributedError",
    "all_reduce_sum",
    "average_buffers",
    "barrier",
    "broadcast_object",
    "fingerprint",
    "gather_objects",
    "is_distributed",
    "is_main",
    "rank",
    "shard",
    "shard_slice",
    "sum_across_ranks",
    "weighted_mean",
    "world_size",
]

T = TypeVar("T")


class DistributedError(RuntimeError):
    """Ranks disagree (different parameters, blocks or sizes), or another rank failed."""


# ---------------------------------------------------------------------------- who am I
def is_distributed() -> bool:
    """Whether ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 in a single process)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this is rank 0: the one process that writes files and prints."""
    return rank() == 0


def shard_slice(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """The contiguous part of ``range(n)`` that rank ``rank_`` of ``world`` holds.

    The first ``n mod world`` ranks hold one example more (shards differ by at most one; a
    rank may hold none when ``n < world``). The slices of all ranks tile ``range(n)`` in order.

    >>> [shard_slice(7, r, 3) for r in range(3)]
    [slice(0, 3, None), slice(3, 5, None), slice(5, 7, None)]

    Raises:
        ValueError: ``n < 0``, ``world < 1`` or ``rank_`` outside ``[0, world)``.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if n < 0 or world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"shard_slice needs n >= 0, world >= 1 and 0 <= rank < world; got "
                         f"n={n}, rank={rank_}, world={world}")
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return slice(start, start + base + (1 if rank_ < extra else 0))


def shard(tensors: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, ...] | None:
    """This rank's :func:`shard_slice` of each tensor (along the first dimension), e.g. of a
    data set ``(X, Y)``; ``None`` stays ``None``, and one process gets the tensors back."""
    if tensors is None:
        return None
    part = shard_slice(len(tensors[0]))
    return tuple(t[part] for t in tensors)


# ------------------------------------------------------------------------ collectives
def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``Σ_r tensor_r`` over ranks, as a new tensor (``tensor`` itself is not changed)."""
    total = tensor.clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def weighted_mean(tensors: Sequence[torch.Tensor], weight: float) -> list[torch.Tensor]:
    """``Σ_r w_r t_r / Σ_r w_r`` over ranks for each tensor, in one all-reduce.

    ``weight`` is this rank's weight (e.g. its share of a mini-batch; 0 for an empty share, whose
    tensors are then ignored — pass zeros). Tensors keep their shapes; the arithmetic runs in the
    promoted dtype of the tensors.

    Raises:
        ValueError: the weights of all ranks sum to zero.
    """
    if not tensors:
        return []
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    device = tensors[0].device
    flat = torch.cat([*(t.detach().reshape(-1).to(device, dtype) * weight for t in tensors),
                      torch.tensor([float(weight)], dtype=dtype, device=device)])
    if is_distributed():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    total = float(flat[-1])
    if total == 0:
        raise ValueError("weighted_mean: the weights of all ranks sum to zero (no examples)")
    out, start = [], 0
    for t in tensors:
        out.append((flat[start:start + t.numel()] / total).reshape(t.shape).to(t.dtype))
        start += t.numel()
    return out


@torch.no_grad()
def average_buffers(module: torch.nn.Module, weight: float) -> None:
    """Replace ``module``'s floating buffers (batch-norm running statistics) by their mean over
    ranks weighted by ``weight``, so every rank measures the same model (in place; a no-op in
    one process).

    A running mean updated on each rank's part of a mini-batch, averaged with the parts' sizes,
    equals the update on the whole mini-batch; a running variance misses the spread between
    the parts' means (as with ``DistributedDataParallel`` without ``SyncBatchNorm``).
    """
    if not is_distributed():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    for buffer, mean in zip(buffers, weighted_mean(buffers, weight), strict=True):
        buffer.copy_(mean)


def fingerprint(tensor: torch.Tensor) -> tuple[float, float]:
    """``(Σ w_i x_i, max |x_i|)`` with fixed weights ``w_i ∈ [1, 2]``: two ranks holding
    different tensors (a sign flip, a permutation, another seed) get different first numbers."""
    flat = tensor.detach().reshape(-1).to(torch.float64)
    if flat.numel() == 0:
        return 0.0, 0.0
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
    return float(flat @ weights), float(flat.abs().max())


def sum_across_ranks(compute: Callable[[], torch.Tensor], device: torch.device | str, *,
                     agree: Mapping[str, torch.Tensor] | None = None,
                     propagate: tuple[type[Exception], ...] = ()) -> torch.Tensor:
    """``Σ_r compute_r()`` over ranks; an exception on any rank is raised on every rank.

    Each rank runs ``compute`` (its local partial sum), then all ranks exchange a small header:
    whether ``compute`` raised, the size of its result and fingerprints of the ``agree``
    tensors. Only if every rank succeeded, agrees and has a result of the same size are the
    results all-reduced. Without a process group this is just ``compute()``.

    Args:
        compute: the local partial sum (any shape; the same on every rank).
        device: where the header travels (the results' device; CUDA for NCCL).
        agree: tensors every rank must hold equal, by name (e.g. the parameters, the block
            being multiplied); their fingerprints may differ by roundoff only
            (``128 eps sqrt(n) max|x|``, far below any real difference in one entry).
        propagate: exception classes re-raised by the same class on the other ranks (with the
            failing rank named); any other exception becomes :class:`DistributedError` there.

    Raises:
        The exception ``compute`` raised on this rank, the ``propagate`` class (or
        :class:`DistributedError`) if another rank failed, and :class:`DistributedError` if the
        ranks disagree.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    agree = dict(agree or {})
    error: Exception | None = None
    result: torch.Tensor | None = None
    try:
        result = compute()
    except Exception as caught:  # re-raised below, after the other ranks have heard of it
        error = caught
    header = torch.zeros(world_size(), 2 + 2 * len(agree), dtype=torch.float64, device=device)
    header[rank(), 0] = 1.0 if error is not None else 0.0
    header[rank(), 1] = float(result.numel()) if result is not None else -1.0
    for i, tensor in enumerate(agree.values()):
        header[rank(), 2 + 2 * i: 4 + 2 * i] = torch.tensor(fingerprint(tensor))
    dist.all_reduce(header, op=dist.ReduceOp.SUM)  # each row is one rank's (exactly: + zeros)
    header = header.cpu()
    if bool(header[:, 0].any()):
        _raise_failure(error, [int(r) for r in header[:, 0].nonzero()[:, 0]], propagate)
    _check_agreement(header, agree)
    if result is None:  # unreachable: this rank's failure was raised above
        raise DistributedError("no partial sum on this rank")
    dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result


def _raise_failure(error: Exception | None, failed: list[int],
                   propagate: tuple[type[Exception], ...]) -> None:
    """Every rank learns what the failing ranks raised (one object gather), then raises.

    Only strings and an index into ``propagate`` travel (no exception classes to unpickle)."""
    mine = None
    if error is not None:
        kind = next((i for i, cls in enumerate(propagate) if isinstance(error, cls)), -1)
        mine = (kind, f"{type(error).__name__}: {error}")
    reports: list[Any] = [None] * world_size()
    dist.all_gather_object(reports, mine)
    if error is not None:
        raise error
    first = failed[0]
    kind, message = reports[first]
    text = f"rank {first} of {world_size()} failed: {message}"
    if kind >= 0:
        try:
            exception = propagate[kind](text)
        except Exception:  # a class whose constructor takes other arguments
            exception = DistributedError(text)
        raise exception
    raise DistributedError(text)


def _check_agreement(header: torch.Tensor, agree: Mapping[str, torch.Tensor]) -> None:
    sizes = header[:, 1]
    if not bool((sizes == sizes[0]).all()):
        raise DistributedError(f"ranks computed partial sums of different sizes "
                               f"{[int(s) for s in sizes]}; every rank must call with the same "
                               "shapes (same model, same block)")
    for i, (name, tensor) in enumerate(agree.items()):
        values, largest = header[:, 2 + 2 * i], header[:, 3 + 2 * i]
        # roundoff (other hardware, other reduction order) passes; a real difference does not
        eps = torch.finfo(tensor.dtype).eps if tensor.is_floating_point() else 0.0
        tol = 128 * eps * max(tensor.numel(), 1) ** 0.5 * float(largest.max())
        gap = float((values - values[0]).abs().max())
        if gap > tol:
            raise DistributedError(
                f"ranks hold different {name} (fingerprints {[f'{v:.10g}' for v in values]}); "
                "every rank must measure the same model at the same point with the same vectors: "
                "seed every rank identically (or broadcast from rank 0, as DistributedDataParallel "
                "does) and pass the same seed / init to the eigensolver")


# --------------------------------------------------------------------------- objects
def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; identity in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
