"""Process groups for many-process runs: joining and leaving the group ``torchrun`` describes,
and running a piece of work on rank 0 alone.

The operator-side collectives (sums over ranks, fingerprints, shards) live in
:mod:`tinysubspace.curvature.collectives` and are re-exported here, so the experiment layer
has one ``tsdist`` namespace.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tinysubspace.curvature.collectives import (
    DistributedError,
    all_reduce_sum,
    average_buffers,
    barrier,
    broadcast_object,
    fingerprint,
    gather_objects,
    is_distributed,
    is_main,
    rank,
    shard,
    shard_slice,
    sum_across_ranks,
    weighted_mean,
    world_size,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedError",
    "all_reduce_sum",
    "average_buffers",
    "barrier",
    "broadcast_object",
    "fingerprint",
    "gather_objects",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "run_on_main",
    "shard",
    "shard_slice",
    "shutdown",
    "sum_across_ranks",
    "weighted_mean",
    "world_size",
]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 600.0
"""Seconds a collective waits for the other ranks before raising (``TINYSUBSPACE_DIST_TIMEOUT``)."""

_OWNED_GROUP = False  # whether init_from_env created the default process group


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every rank gets its result, or raises its exception.

    For what one process must do alone (create a run folder, read a checkpoint) while the
    others wait: if rank 0 fails, every rank raises the same exception class instead of
    waiting for a collective that never comes.
    """
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    error: Exception | None = None
    if is_main():
        try:
            box = [("ok", fn())]
        except Exception as caught:
            error = caught
            box = [("error", (type(caught), str(caught)))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "ok":
        return value
    if error is not None:
        raise error
    cls, message = value
    try:
        exception = cls(message)
    except Exception:
        exception = DistributedError(f"rank 0 failed: {cls.__name__}: {message}")
    raise exception


# ------------------------------------------------------------------------ start, stop
def init_from_env(timeout_s: float | None = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment.

    Does nothing (returns ``False``) without ``torchrun``'s variables, or for one process.
    Backend: ``gloo`` without CUDA; with CUDA ``cpu:gloo,cuda:nccl`` (NCCL for tensors on the
    GPU, gloo for CPU tensors and objects), and this process's GPU is ``LOCAL_RANK``
    (``torch.cuda.set_device``). ``TINYSUBSPACE_DIST_BACKEND`` overrides the backend.

    Args:
        timeout_s: how long a collective waits for the other ranks before raising (default
            ``TINYSUBSPACE_DIST_TIMEOUT`` or 600 s): a rank that stalls or dies makes the
            others raise after at most this long instead of hanging.

    Returns:
        Whether this process now runs distributed (world size > 1).
    """
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local % torch.cuda.device_count())
    backend = os.environ.get("TINYSUBSPACE_DIST_BACKEND") or (
        "cpu:gloo,cuda:nccl" if cuda else "gloo")
    seconds = timeout_s if timeout_s is not None else float(
        os.environ.get("TINYSUBSPACE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    global _OWNED_GROUP
    _OWNED_GROUP = True
    return is_distributed()


def shutdown() -> None:
    """Leave the process group, if :func:`init_from_env` created it."""
    global _OWNED_GROUP
    if _OWNED_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED_GROUP = False
